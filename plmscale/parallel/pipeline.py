"""Pipeline parallelism: the trunk cut into stages for DeepSpeed's pipeline engine.

Each stage is one `PipelineStage`: a `ModelPart` of the trunk (its transformer layers; the embeddings on the
first stage; the final LayerNorm and heads on the last) built under the whole model's parameter names, so
state dicts move between layouts by name. The `PipelineModule` holds one stage per pipeline rank (the
"uniform" partition of P items). The first and last stages are `TiedLayerSpec`s of one key, so DeepSpeed
keeps their word embeddings equal, broadcast at start and gradients all-reduced every step: the last stage's
head projects onto the embedding.

Between stages travels a tuple (hidden states, padding mask, attention patterns, target positions, span
boundaries, pair flag), an absent one being an empty tensor: what every stage's attention reads (UniLM's
per-sample patterns) and what the last stage's heads read besides the hidden states (the flat positions of
the targets, where the MLM head runs: all of them, as many as the batch has, say it runs everywhere;
SpanBERT's boundary head the boundary positions; the pair head runs where the flag is set, on batches with
pair labels). Only the hidden states are floating point, so only they receive gradients; the rest are int64,
for which DeepSpeed sends no gradient. Shapes are announced per micro-batch (`dynamic_shape`), because
training and held-out batches differ in what they carry. Labels reach the last stage only, where `loss_fn`
turns the heads' output, the whole model's for the same inputs, into the objective's loss terms.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from plmscale.config import ModelConfig, RunConfig
from plmscale.distill.cache import TEACHER_TOP_K
from plmscale.model import TransformerLM
from plmscale.model.transformer import ModelPart
from plmscale.objectives import Objective
from plmscale.objectives.base import TARGET_POSITIONS, target_positions
from plmscale.parallel.distributed import Topology
from plmscale.parallel.tensor_parallel import MegatronLayers

TIED_KEY = "word_embeddings"
_ABSENT = torch.empty(0, dtype=torch.long)


def stage_parts(cfg: ModelConfig, stages: int, partition: list[int] | None = None) -> list[ModelPart]:
    """The part of the trunk each stage holds: `partition` layers per stage, or an even split."""
    counts = partition or [cfg.num_layers // stages] * stages
    parts, first = [], 0
    for stage, count in enumerate(counts):
        parts.append(ModelPart(first, first + count, embeddings=stage == 0, head=stage == stages - 1))
        first += count
    return parts


def _present(tensor: torch.Tensor) -> torch.Tensor | None:
    return tensor if tensor.numel() else None


class PipelineStage(TransformerLM):
    """A part of the trunk whose forward takes and returns the tuples that travel between stages."""

    def forward(self, inputs: tuple[torch.Tensor, ...]):
        if self.part.embeddings:
            input_ids, attention_mask, token_type_ids, attention_pattern, *for_heads = inputs
            x = self.embed(input_ids, _present(token_type_ids))
        else:
            x, attention_mask, attention_pattern, *for_heads = inputs
        x = self.encode(x, _present(attention_mask), attention_pattern=_present(attention_pattern))
        if not self.part.head:
            return x, attention_mask, attention_pattern, *for_heads
        positions, span_boundaries, classify_pair = for_heads
        everywhere = positions.numel() == x.shape[0] * x.shape[1]  # a shape: no synchronization
        return self.output(
            x,
            None if everywhere else positions,
            _present(classify_pair) is not None,
            _present(span_boundaries),
        )


# The batch fields that reach the last stage as "labels": the targets and their positions (SpanBERT's are
# where the span boundaries say; UniLM's held-out loss is broken down by mode), and the inputs too, all that
# a distillation teacher (whole, on the last stage's ranks) reads (UniLM's attention patterns among them),
# or its cached top-k logits.
_LABEL_FIELDS = (
    "labels", "pair_label", "span_boundaries", "mode", "input_ids", "attention_mask", "token_type_ids",
    "attention_pattern", TARGET_POSITIONS, *TEACHER_TOP_K,
)  # fmt: skip


def pipeline_batch(objective: Objective, batch: dict[str, torch.Tensor]) -> tuple[tuple, tuple]:
    """(first stage's inputs, last stage's labels) of a micro-batch, in the engine's (inputs, labels) form."""
    inputs = objective.model_inputs(batch)
    first = [
        inputs.get(key, _ABSENT)
        for key in ("input_ids", "attention_mask", "token_type_ids", "attention_pattern")
    ]
    classify_pair = torch.ones(1, dtype=torch.long) if inputs.get("classify_pair") else _ABSENT
    first += [target_positions(batch), inputs.get("span_boundaries", _ABSENT), classify_pair]
    return tuple(first), tuple(batch.get(key, _ABSENT) for key in _LABEL_FIELDS)


def labels_batch(labels: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    """The batch the objective's loss reads, from the labels that reached the last stage."""
    return {key: tensor for key, tensor in zip(_LABEL_FIELDS, labels, strict=True) if tensor.numel()}


def last_stage_loss(loss: Callable[[object, dict], torch.Tensor]) -> Callable[[object, tuple], torch.Tensor]:
    """The engine's `loss_fn(outputs, labels)` from a loss of (model outputs, batch)."""

    def loss_fn(outputs, labels: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return loss(outputs, labels_batch(labels))

    return loss_fn


def build_pipeline_model(
    cfg: RunConfig, topo: Topology, loss_fn: Callable[[object, tuple], torch.Tensor]
) -> PipelineModule:
    """The trunk as a `PipelineModule` over the TP x PP x DP grid; this rank builds only its own stage.
    `loss_fn` as made by `last_stage_loss`."""
    stages = cfg.parallel.pipeline_parallel
    spec = MegatronLayers()
    layers = [
        TiedLayerSpec(
            TIED_KEY, PipelineStage, cfg.model, spec, part, tied_weight_attr=["word_embeddings.weight"]
        )
        if part.embeddings or part.head
        else LayerSpec(PipelineStage, cfg.model, spec, part)
        for part in stage_parts(cfg.model, stages, cfg.parallel.pipeline_partition)
    ]
    module = PipelineModule(
        layers=layers,
        topology=PipeModelDataParallelTopology(num_pp=stages, num_mp=topo.tp_size, num_dp=topo.dp_size),
        loss_fn=loss_fn,
        partition_method="uniform",
        dynamic_shape=True,
    )
    if topo.is_last_stage:
        # DeepSpeed marks every parameter of a tied module's second copy as a replica, so that the gradient
        # norm counts it once; here that module is the whole last stage, of which only the embedding is one.
        for name, param in module.named_parameters():
            param.ds_pipe_replicated = name.endswith("word_embeddings.weight")
    return module
