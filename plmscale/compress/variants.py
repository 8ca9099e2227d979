"""The deployed variants of one model: fp32 PyTorch (the model directory itself), int8 PyTorch, ONNX fp32 and
ONNX int8 under onnxruntime. Each is written to its own file, then read back from that file to be measured:
what is scored and timed is what is on disk.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from plmscale.compress import VARIANTS
from plmscale.compress.int8 import load_int8, quantize_int8, save_int8
from plmscale.compress.onnx import ONNX_FILE, OnnxClassifier, OnnxLM, export_onnx, quantize_onnx
from plmscale.objectives.base import target_positions


class Deployment:
    """The variants of `model` (a `TransformerLM`, or a fine-tuned `SequenceClassifier`) under `out_dir`.
    `fp32_file` is the model's own weights file, the fp32 variant's bytes on disk."""

    def __init__(self, model: nn.Module, fp32_file: Path, out_dir: Path, threads: int | None = None):
        self.model, self.out_dir, self.threads = model.eval(), Path(out_dir), threads
        self.files: dict[str, Path] = {"fp32": Path(fp32_file)}
        self.classifier = hasattr(model, "trunk")

    def file(self, variant: str) -> Path:
        """Write the variant (once) and return its file."""
        if variant not in self.files:
            if variant == "int8":
                path = save_int8(quantize_int8(self.model), self.out_dir / "int8")
            elif variant == "onnx":
                path = export_onnx(self.model, self.out_dir / "onnx" / ONNX_FILE)
            elif variant == "onnx-int8":
                path = quantize_onnx(self.file("onnx"), self.out_dir / "onnx-int8" / ONNX_FILE)
            else:
                raise ValueError(f"unknown variant {variant!r}: one of {VARIANTS}")
            self.files[variant] = path
        return self.files[variant]

    def load(self, variant: str):
        """The variant read back from its file, callable as the PyTorch model is by evaluation."""
        path = self.file(variant)
        if variant == "fp32":
            return self.model
        if variant == "int8":
            return load_int8(copy.deepcopy(self.model), path)
        return (OnnxClassifier if self.classifier else OnnxLM)(path, self.threads)


@torch.inference_mode()
def logit_parity(reference: nn.Module, variant, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max |logit difference| from the fp32 model at the targets of a held-out batch, and the share of those
    targets where both predict the same token (top-1 agreement)."""
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    positions = target_positions(batch)
    ours = reference(**inputs, target_positions=positions).float()
    theirs = variant(**inputs, target_positions=positions).float()
    return {
        "max_logit_difference": (ours - theirs).abs().max().item(),
        "top1_agreement": (ours.argmax(-1) == theirs.argmax(-1)).double().mean().item(),
    }
