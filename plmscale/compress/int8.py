"""int8 for CPU deployment: post-training dynamic quantization of every `nn.Linear` (PyTorch's eager
`quantize_dynamic`, fbgemm/x86 kernels), and its file.

Weights are quantized once, per output channel, symmetric int8; activations are quantized on the fly per
batch, so no calibration data is needed and embeddings, LayerNorms and the tied output projection stay fp32.
PyTorch marks `torch.ao.quantization` as deprecated in favour of torchao, whose CPU int8 path needs
`torch.compile` to be fast; the eager kernels are still shipped in torch 2.13 and are what runs fast
without a compiler, so they are used here (their deprecation warnings are silenced).

The file, `model.int8.safetensors`, holds each quantized linear's int8 weight (`NAME.weight_int8`), its
per-channel scales and zero points and its fp32 bias, and every other parameter in fp32: what is on disk is
the deployed model, and `load_int8` rebuilds exactly it (no pickle, as for every plmscale model file).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

INT8_WEIGHTS = "model.int8.safetensors"


def _quantized_linear_type() -> type:
    from torch.ao.nn.quantized.dynamic import Linear

    return Linear


def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy of `model` (in eval mode) whose `nn.Linear` layers run int8 weights and activations."""
    with _deprecation_silenced():
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        return quantize_dynamic(model.eval(), {nn.Linear: per_channel_dynamic_qconfig}, inplace=False)


@contextmanager
def _deprecation_silenced():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        yield


def int8_tensors(quantized: nn.Module) -> dict[str, torch.Tensor]:
    """The quantized model as named plain tensors (see the module docstring)."""
    tensors = {name: p.detach() for name, p in quantized.named_parameters()}
    for name, module in quantized.named_modules():
        if isinstance(module, _quantized_linear_type()):
            weight = module.weight()
            tensors[f"{name}.weight_int8"] = weight.int_repr()
            tensors[f"{name}.weight_scale"] = weight.q_per_channel_scales()
            tensors[f"{name}.weight_zero_point"] = weight.q_per_channel_zero_points()
            if module.bias() is not None:
                tensors[f"{name}.bias"] = module.bias()
    return {name: t.contiguous() for name, t in tensors.items()}


def save_int8(quantized: nn.Module, directory: str | Path) -> Path:
    path = Path(directory) / INT8_WEIGHTS
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(int8_tensors(quantized), str(path))
    return path


def load_int8(model: nn.Module, path: str | Path) -> nn.Module:
    """`model` (the fp32 architecture; its weights are replaced) quantized and filled from `path`."""
    tensors = load_file(str(path))
    quantized = quantize_int8(model)
    expected = set(int8_tensors(quantized))
    if expected != set(tensors):
        raise ValueError(f"{path}: holds other tensors than this architecture's int8 model")
    for name, param in quantized.named_parameters():
        param.data.copy_(tensors[name])
    for name, module in quantized.named_modules():
        if isinstance(module, _quantized_linear_type()):
            scale, zero_point = tensors[f"{name}.weight_scale"], tensors[f"{name}.weight_zero_point"]
            real = (tensors[f"{name}.weight_int8"].double() - zero_point[:, None]) * scale[:, None]
            with _deprecation_silenced():  # requantized on the same grid: the same int8 values
                weight = torch.quantize_per_channel(real.float(), scale, zero_point, 0, torch.qint8)
            if not torch.equal(weight.int_repr(), tensors[f"{name}.weight_int8"]):
                raise ValueError(f"{path}: {name}'s int8 weight does not fit its scales")
            module.set_weight_bias(weight, tensors.get(f"{name}.bias"))
    return quantized.eval()
