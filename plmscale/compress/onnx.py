"""ONNX export of a model directory (or a fine-tuned classifier) and its runs under onnxruntime, in fp32 and
with onnxruntime's dynamic int8 quantization.

The language model's graph takes `input_ids`, `attention_mask` (and `token_type_ids` where the model has
segment embeddings), batch and sequence dynamic, and has two outputs: `hidden_states` (the final LayerNorm's,
what a feature extractor or a classifier reads, and what speed is measured on) and `logits` at every
position. onnxruntime computes only the outputs asked for, so one file serves both. The classifier's graph
has the same inputs and its `logits`. Graphs are exported by `torch.export` (`torch.onnx.export(dynamo=True)`,
the maintained exporter) into one self-contained file, then checked against the PyTorch forward.

The runners (`OnnxLM`, `OnnxClassifier`) answer the calls evaluation and fine-tuning's scoring make of a
PyTorch model, so held-out MLM, speed and the task metric are measured by the same code for every variant.
Needs the `deploy` extra: `pip install 'plmscale[deploy]'` (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from plmscale.errors import UserError
from plmscale.model.layers import LocalLayers

ONNX_FILE = "model.onnx"
FP32_ATOL = 1e-4  # the same fp32 math in two runtimes (observed ~1e-6 on hidden states, ~1e-5 on logits)
DEPLOY_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


def check_onnx_installed() -> None:
    missing = [name for name in DEPLOY_PACKAGES if _missing(name)]
    if missing:
        raise UserError(
            f"ONNX variants need {', '.join(missing)}: pip install 'plmscale[deploy]' "
            "(or ask for --variants fp32 int8 only)"
        )


def _missing(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except ValueError:  # a module set to None in sys.modules: unavailable
        return True


class LanguageModelGraph(nn.Module):
    """What is exported of a `TransformerLM`: final hidden states and the head's logits at every position."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        hidden = self.model.hidden_states(input_ids, attention_mask, token_type_ids)
        return hidden, self.model.head(hidden, self.model.word_embeddings.weight)


def input_names(model: nn.Module) -> list[str]:
    trunk = getattr(model, "trunk", model)
    segments = getattr(trunk, "token_type_embeddings", None) is not None
    return ["input_ids", "attention_mask"] + ["token_type_ids"] * segments


def example_inputs(names: list[str], cfg, batch: int = 2) -> tuple[torch.Tensor, ...]:
    seq = min(8, cfg.max_position_embeddings)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, cfg.vocab_size, (batch, seq), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, seq // 2 :] = 0  # a padded row
    second = (torch.arange(seq) >= seq // 2) & (cfg.type_vocab_size >= 2)  # segment B where there is one
    token_type_ids = second.long().expand(batch, seq).contiguous()
    return (input_ids, attention_mask, token_type_ids)[: len(names)]


@contextmanager
def _quiet():
    """The exporter narrates each stage and warns of its internals; onnxruntime's quantizer logs advice
    through the root logger. Failures still raise."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def export_onnx(model: nn.Module, path: str | Path) -> Path:
    """Export a `TransformerLM` (as `LanguageModelGraph`) or a `SequenceClassifier` to one .onnx file, and
    check it against the PyTorch forward within `FP32_ATOL`."""
    check_onnx_installed()
    model = model.eval()
    classifier = hasattr(model, "trunk")
    cfg = model.trunk.cfg if classifier else model.cfg
    graph = model if classifier else LanguageModelGraph(model).eval()
    names = input_names(model)
    outputs = ["logits"] if classifier else ["hidden_states", "logits"]
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("seq", max=cfg.max_position_embeddings)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet():
        torch.onnx.export(
            graph,
            example_inputs(names, cfg),
            str(path),
            input_names=names,
            output_names=outputs,
            dynamic_shapes={name: {0: batch, 1: seq} for name in names},
            external_data=False,
        )
    difference = max_difference(graph, OnnxSession(path), cfg, names)
    if difference > FP32_ATOL:
        raise RuntimeError(f"{path}: onnxruntime differs from PyTorch by {difference:.3g} (> {FP32_ATOL})")
    return path


@torch.inference_mode()
def max_difference(graph: nn.Module, session: OnnxSession, cfg, names: list[str]) -> float:
    """Max |PyTorch - onnxruntime| over every output, on inputs of another shape than the export's."""
    inputs = example_inputs(names, cfg, batch=3)
    ours = graph(*inputs)
    ours = ours if isinstance(ours, tuple) else (ours,)
    theirs = session.run(None, dict(zip(names, inputs, strict=True)))
    return max((a - b).abs().max().item() for a, b in zip(ours, theirs, strict=True))


def quantize_onnx(source: str | Path, target: str | Path) -> Path:
    """onnxruntime's dynamic quantization: int8 weights of every MatMul (per output channel) and of the
    embedding tables it can, activations quantized per batch at run time."""
    check_onnx_installed()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    Path(target).parent.mkdir(parents=True, exist_ok=True)
    with _quiet():
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True)
    return Path(target)


class OnnxSession:
    """An onnxruntime CPU session with torch's thread count; tensors in, tensors out."""

    def __init__(self, path: str | Path, threads: int | None = None):
        check_onnx_installed()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        # idle threads sleep rather than spin: CPU time then measures the work, as it does for PyTorch
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, outputs: list[str] | None, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        arrays = {name: np.ascontiguousarray(feeds[name].numpy()) for name in self.input_names}
        return [torch.from_numpy(out) for out in self.session.run(outputs, arrays)]

    def feeds(self, input_ids, attention_mask=None, token_type_ids=None) -> dict[str, torch.Tensor]:
        feeds = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids) if attention_mask is None else attention_mask,
        }
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = (
                torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            )
        return feeds


class OnnxLM:
    """A `LanguageModelGraph` file run by onnxruntime, called as `TransformerLM` is by evaluation."""

    spec = LocalLayers()

    def __init__(self, path: str | Path, threads: int | None = None):
        self.session = OnnxSession(path, threads)

    def hidden_states(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        feeds = self.session.feeds(input_ids, attention_mask, token_type_ids)
        return self.session.run(["hidden_states"], feeds)[0]

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, target_positions=None):
        feeds = self.session.feeds(input_ids, attention_mask, token_type_ids)
        logits = self.session.run(["logits"], feeds)[0]
        return logits if target_positions is None else logits.flatten(0, 1).index_select(0, target_positions)

    def parameters(self):
        return iter(())  # counted on the PyTorch model the file was exported from

    def eval(self) -> OnnxLM:
        return self


class OnnxClassifier:
    """A fine-tuned `SequenceClassifier`'s graph run by onnxruntime, called as fine-tuning scores one."""

    def __init__(self, path: str | Path, threads: int | None = None):
        self.session = OnnxSession(path, threads)

    def __call__(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        return self.session.run(["logits"], self.session.feeds(input_ids, attention_mask, token_type_ids))[0]

    def eval(self) -> OnnxClassifier:
        return self
