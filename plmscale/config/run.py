"""RunConfig, a whole recipe: its sections and what must hold across them (parallel layout against the
model's shape, ZeRO stage against pipeline stages, batch sizes against the number of processes). Each
section checks its own keys; the DeepSpeed JSON a run launches with is derived in deepspeed_json.py."""

from __future__ import annotations

from typing import Any

from pydantic import model_validator

from plmscale.config.base import ConfigError, StrictModel
from plmscale.config.deepspeed_json import derive_deepspeed_config, zero_stage
from plmscale.config.distill import DistillConfig
from plmscale.config.model import ModelConfig
from plmscale.config.sections import DataConfig, ObjectiveConfig, OptimizerConfig, ParallelConfig, TrainConfig


class RunConfig(StrictModel):
    model: ModelConfig
    data: DataConfig
    objective: ObjectiveConfig
    parallel: ParallelConfig = ParallelConfig()
    optimizer: OptimizerConfig
    train: TrainConfig
    distill: DistillConfig | None = None

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.model.max_position_embeddings < self.data.seq_length:
            raise ValueError(
                f"data.seq_length={self.data.seq_length} exceeds "
                f"model.max_position_embeddings={self.model.max_position_embeddings}"
            )
        tp = self.parallel.tensor_parallel
        for what, size in (
            ("model.num_heads", self.model.num_heads),
            ("model.ffn_hidden_size", self.model.ffn_size),
            ("the padded vocabulary (model.pad_vocab_to_multiple_of)", self.model.padded_vocab_size),
        ):
            if size % tp:
                raise ValueError(f"parallel.tensor_parallel={tp} must divide {what}={size}")
        if self.model.generator_hidden_fraction is not None:
            gen = self.model.generator_config()
            for what, size in (("heads", gen.num_heads), ("FFN width", gen.ffn_size)):
                if size % tp:
                    raise ValueError(
                        f"parallel.tensor_parallel={tp} must divide the generator's {what} {size} "
                        f"(model.generator_hidden_fraction={self.model.generator_hidden_fraction})"
                    )
        stage = zero_stage(self.train.deepspeed_config)
        if self.parallel.pipeline_parallel > 1 and stage >= 2:
            raise ValueError(
                f"train.deepspeed_config uses ZeRO stage {stage} but parallel.pipeline_parallel="
                f"{self.parallel.pipeline_parallel}: DeepSpeed's pipeline engine supports ZeRO stage 0-1 only"
            )
        self._check_pipeline()
        if self.parallel.pipeline_parallel > 1 and self.model.distinct_layers < self.model.num_layers:
            raise ValueError(
                f"parallel.pipeline_parallel={self.parallel.pipeline_parallel} with model.layer_groups="
                f"{self.model.layer_groups}: a layer shared across stages would need its weights and "
                "gradients tied between stages; use tensor_parallel and ZeRO"
            )
        if self.distill and self.model.layer_groups is not None:
            raise ValueError("distill: a student with shared layers (model.layer_groups) is not supported")
        self._check_pipeline_heads()
        if self.train.activation_checkpointing > self.model.num_layers:
            raise ValueError(
                f"train.activation_checkpointing={self.train.activation_checkpointing} exceeds "
                f"model.num_layers={self.model.num_layers} (k checkpoints every k-th layer)"
            )
        if self.train.global_batch_size % self.train.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size={self.train.global_batch_size} is not a multiple of "
                f"train.micro_batch_size={self.train.micro_batch_size}"
            )
        if self.distill and self.distill.student_layers is not None and not self.distill.student_layers:
            raise ValueError("distill.student_layers must not be empty")
        if self.distill and (
            self.model.span_boundary_head or self.model.generator_hidden_fraction is not None
        ):
            raise ValueError(
                "distill: the distillation loss covers a trunk's token loss only, not SpanBERT's boundary head "
                "(model.span_boundary_head) or ELECTRA's pair of models (model.generator_hidden_fraction)"
            )
        return self

    def _check_pipeline(self) -> None:
        pp, layers, partition = (
            self.parallel.pipeline_parallel,
            self.model.num_layers,
            self.parallel.pipeline_partition,
        )
        if partition is not None:
            if len(partition) != pp or min(partition) < 1 or sum(partition) != layers:
                raise ValueError(
                    f"parallel.pipeline_partition={partition} must give each of the "
                    f"parallel.pipeline_parallel={pp} stages at least one layer, {layers} (model.num_layers) in all"
                )
        elif layers % pp:
            raise ValueError(
                f"parallel.pipeline_parallel={pp} must divide model.num_layers={layers} "
                "(or set parallel.pipeline_partition)"
            )

    def _check_pipeline_heads(self) -> None:
        """Pipeline stages pass hidden states, masks and span boundaries; ELECTRA needs more."""
        pp = self.parallel.pipeline_parallel
        if pp > 1 and self.model.generator_hidden_fraction is not None:
            raise ValueError(
                f"parallel.pipeline_parallel={pp} with model.generator_hidden_fraction (ELECTRA): the "
                "generator's samples feed the discriminator's first layer, a second pass through every "
                "stage that DeepSpeed's pipeline schedule has no place for; use tensor_parallel and ZeRO"
            )

    def warnings(self, world_size: int) -> list[str]:
        """What is legal but likely a mistake, for a given number of processes."""
        found = []
        micro_batches, pp = self.check_world(world_size), self.parallel.pipeline_parallel
        if pp > 1 and micro_batches < pp:
            found.append(
                f"{micro_batches} micro-batch(es) per step for {pp} pipeline stages: the pipeline is idle "
                f"{(pp - 1) / (micro_batches + pp - 1):.0%} of the step; raise train.global_batch_size or "
                "lower train.micro_batch_size"
            )
        return found

    def check_world(self, world_size: int) -> int:
        """Checks what depends on the number of processes; returns the gradient-accumulation steps."""
        tp, pp = self.parallel.tensor_parallel, self.parallel.pipeline_parallel
        if world_size % (tp * pp):
            raise ConfigError(
                f"parallel.tensor_parallel={tp} x parallel.pipeline_parallel={pp} must divide the "
                f"world size {world_size}"
            )
        dp = world_size // (tp * pp)
        per_step = self.train.micro_batch_size * dp
        if self.train.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size={self.train.global_batch_size} is not a multiple of "
                f"train.micro_batch_size={self.train.micro_batch_size} x data-parallel size {dp}"
            )
        return self.train.global_batch_size // per_step

    @property
    def guarded_optimizer(self) -> bool:
        """ZeRO-0 in fp32 steps the bare torch optimizer, which neither reports the gradient norm nor skips
        a non-finite update: plmscale passes its own there (plmscale/training/guard.py), which clips too."""
        return zero_stage(self.train.deepspeed_config) == 0 and self.train.precision == "fp32"

    def deepspeed_config(self, world_size: int) -> dict[str, Any]:
        """The DeepSpeed JSON: the ZeRO file from ds_configs/ plus what this recipe owns."""
        return derive_deepspeed_config(self, world_size)
