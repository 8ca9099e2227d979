"""The training loop (pre-training and distillation), run once per process by the `deepspeed` launcher.

    deepspeed --num_gpus 2 -m plmscale.cli train --config launch/recipes/bert_tiny_demo.yaml

Every loss term is a (sum, count) pair; each step the global count of every term's targets is all-reduced
first, so the gradient is that of the sum over terms of sum / global count (one term for most objectives,
MLM + pair for BERT / ALBERT) however the targets fall across micro-batches, ranks and pipeline stages.

One loop for every layout: a step's micro-batches run one by one through DeepSpeed's engine, or, with
pipeline stages, through the pipeline engine's schedule (`train_batch` / `eval_batch`), which calls the same
loss function on the last stage.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from plmscale import model_dir
from plmscale.config import RunConfig, save_config
from plmscale.data.loader import Prefetched, SampleOrder
from plmscale.data.sources import sample_order
from plmscale.distill import Distillation, default_student_layers, student_state_from_teacher
from plmscale.distill.cache import TeacherCache, WithTeacherTopK
from plmscale.distill.loss import term_counts
from plmscale.distill.student import check_student_config
from plmscale.manifest import tokenizer_path
from plmscale.objectives import LossTerm, get_objective, term_metrics
from plmscale.parallel.checkpointing import checkpoint_layers
from plmscale.parallel.distributed import DeepSpeedMPU, Topology, all_reduce_sum, device, init_distributed
from plmscale.parallel.pipeline import build_pipeline_model, last_stage_loss, pipeline_batch
from plmscale.parallel.state_dict import full_state_dict, load_full_state_dict
from plmscale.parallel.tensor_parallel import build_parallel_model
from plmscale.plan import hardware_flops_per_token, model_flops_per_token
from plmscale.preflight import check_data
from plmscale.training import checkpoint
from plmscale.training.guard import DivergenceGuard, TrainingDiverged, guarded_optimizer, nonfinite_to_nan
from plmscale.training.host_memory import keep_freed_memory
from plmscale.training.metrics import MetricsLogger

# Where the distillation losses' learned projections sit in the student while it trains; not exported.
DISTILL_MODULES = "distill_losses"


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, LayerNorms and other vectors."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _dropout_seed(seed: int, step: int, micro: int) -> int:
    """Dropout randomness is a function of the step, so a resumed run draws the same masks."""
    return (seed * 1_000_003 + step * 1_009 + micro) % (2**63)


class StepTotals:
    """The loss function of a step's micro-batches: each term's sum scaled by the trainer's factor (the
    inverse of its global count), with the unscaled sums, counts and hits kept for the step's metrics.
    Tensors stay on the device until the step ends: no host synchronization per micro-batch."""

    def __init__(self, terms):
        self.terms = terms  # (outputs, batch, count_correct) -> {name: LossTerm}
        self.start({})

    def start(self, scales: dict[str, float], count_correct: bool = False) -> None:
        self.scales, self.count_correct = scales, count_correct
        self.sums, self.counts, self.correct = {}, Counter(), Counter()

    def __call__(self, outputs, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        terms = self.terms(outputs, batch, self.count_correct)
        for name, term in terms.items():
            detached = term.sum.detach().double()
            self.sums[name] = self.sums[name] + detached if name in self.sums else detached
            self.counts[name] += term.count
            if term.correct is not None:
                self.correct[name] += term.correct
        # a non-finite loss poisons the gradient, so that the optimizer skips the update (see guard.py)
        return nonfinite_to_nan(sum(term.sum * self.scales.get(name, 1.0) for name, term in terms.items()))

    def reduced(self, names: list[str], contribute: bool) -> tuple[dict, dict, dict]:
        """Global (sums, counts, hits) of the terms `names` (known on every rank), from the ranks that
        `contribute` one copy each; hits only for the terms that counted them."""
        local = [float(self.sums[n]) if n in self.sums else 0.0 for n in names]
        local += [self.counts[n] for n in names] + [self.correct[n] for n in names]
        local += [float(n in self.correct) for n in names]
        values = all_reduce_sum(local, contribute)
        k = len(names)
        sums, counts = (
            dict(zip(names, values[:k], strict=True)),
            dict(zip(names, values[k : 2 * k], strict=True)),
        )
        hits = {n: values[2 * k + i] for i, n in enumerate(names) if values[3 * k + i]}
        return sums, counts, hits


class Trainer:
    def __init__(self, cfg: RunConfig, world_size: int):
        self.cfg = cfg
        self.accumulation = cfg.check_world(world_size)
        ds_config = cfg.deepspeed_config(world_size)
        if get_accelerator().device_name() == "cpu":  # the activations are host memory
            keep_freed_memory()
        self.topo: Topology = init_distributed(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel)
        self.pipelined = self.topo.pp_size > 1
        torch.manual_seed(cfg.train.seed)
        self.objective = get_objective(cfg.objective.name, cfg.objective.params, cfg.model)
        self.manifest_tokenizer = self._check_tokenizer()
        dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        self.totals = StepTotals(self._terms)
        if self.pipelined:
            self.model = build_pipeline_model(cfg, self.topo, last_stage_loss(self.totals))
        else:
            self.model = build_parallel_model(cfg.model)
        self.spec = next(m.spec for m in self.model.modules() if hasattr(m, "spec"))
        checkpoint_layers(self.model, cfg.train.activation_checkpointing)
        if cfg.train.init_from:  # imported or trained weights; a checkpoint, if any, wins on resume
            load_full_state_dict(self.model, model_dir.load_state(cfg.train.init_from))
        self.distillation = self._set_up_distillation(dtype) if cfg.distill else None
        param_groups = _param_groups(self.model, cfg.optimizer.weight_decay)
        mpu = self.model.mpu() if self.pipelined else DeepSpeedMPU()
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.model,
            model_parameters=param_groups,
            optimizer=guarded_optimizer(cfg, param_groups, mpu),
            config=ds_config,
            # a pipelined model brings its own grid of the same groups (see plmscale.parallel.distributed)
            mpu=None if self.pipelined else mpu,
        )
        self.guard = DivergenceGuard(cfg.train, self.engine)
        self.device = device()
        # Ranks that hold one copy of each loss value: TP rank 0 of the last stage in each pipeline.
        self.reports_loss = self.topo.is_last_stage and self.topo.tp_rank == 0
        train_batches = self._batch_source(cfg.data.train_split, shuffle=True)
        if cfg.distill and cfg.distill.teacher_cache:  # the teacher's top-k logits come with each batch
            train_batches = WithTeacherTopK(train_batches, TeacherCache(cfg.distill.teacher_cache))
        pinned = self.device.type != "cpu"  # page-locked: asynchronous copies to the device
        self.train_data = Prefetched(train_batches, cfg.train.train_steps, pinned)
        self.valid_data = self._batch_source(cfg.data.valid_split, shuffle=False)
        self.output = Path(cfg.train.output_dir)
        self.checkpoints = self.output / "checkpoints"

    def _check_tokenizer(self) -> str:
        """The shards' tokenizer; the data was checked before launch (`plmscale.preflight`), the cheap part
        is checked again here for whoever builds a Trainer without it."""
        return str(tokenizer_path(check_data(self.cfg, verify=False)))

    def _batch_source(self, split: str, shuffle: bool) -> SampleOrder:
        return sample_order(self.cfg, self.objective, split, shuffle, self.topo.dp_size, self.topo.dp_rank)

    def _set_up_distillation(self, dtype: torch.dtype) -> Distillation | None:
        """Teacher built with the same tensor parallelism, student initialized from its layers (or from
        `train.init_from`: a pruned model recovering from its unpruned self). With pipeline stages, the
        whole teacher runs on the last stage's ranks, where the student's logits are.
        The losses' learned projections join the student (as `DISTILL_MODULES`) to be trained with it."""
        d = self.cfg.distill
        teacher_cfg = model_dir.load_run_config(d.teacher).model
        layers = d.student_layers or default_student_layers(teacher_cfg.num_layers, self.cfg.model.num_layers)
        check_student_config(teacher_cfg, self.cfg.model, layers)
        teacher_state = model_dir.load_state(d.teacher)
        if self.cfg.train.init_from:  # loaded above: e.g. a pruned model, recovering from its unpruned self
            if self.topo.is_main:
                print(f"student from train.init_from={self.cfg.train.init_from}")
        else:
            state, how = student_state_from_teacher(
                teacher_state, full_state_dict(self.model), layers, teacher_cfg, self.cfg.model
            )
            load_full_state_dict(self.model, state)
            if self.topo.is_main:
                print(
                    f"student from teacher layers {layers}: " + ", ".join(f"{n} {k}" for k, n in how.items())
                )
        if not self.topo.is_last_stage:
            return None
        teacher = None  # with a cache of its top-k logits, the teacher does not run
        if not d.teacher_cache:
            teacher = build_parallel_model(teacher_cfg)
            load_full_state_dict(teacher, teacher_state)
            teacher.to(device=device(), dtype=dtype)
        distillation = Distillation.from_config(d, teacher, teacher_cfg, self.cfg.model, self.objective)
        if len(distillation.trainable):  # only without pipeline stages (see plmscale.config)
            self.model.add_module(DISTILL_MODULES, distillation.trainable)
        return distillation

    def _to_device(self, batch: dict) -> dict:
        return {
            k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
        }

    def _terms(self, outputs, batch: dict[str, torch.Tensor], count_correct: bool) -> dict[str, LossTerm]:
        if self.distillation and self.model.training:  # pair objectives are not distilled
            return self.distillation(outputs, batch, self.spec)
        return self.objective.loss_terms(outputs, batch, self.spec, count_correct)

    def _target_counts(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        if self.cfg.distill:
            return term_counts(self.cfg.distill, self.objective, batch)
        return self.objective.target_counts(batch)

    def _run(self, batches: list[dict[str, torch.Tensor]], step: int, train: bool) -> None:
        """Forward (and with `train`, backward and the optimizer step) over a step's micro-batches; the
        losses land in `self.totals`."""
        if self.pipelined:
            micro_batches = iter([pipeline_batch(self.objective, b) for b in batches])
            if train:
                torch.manual_seed(_dropout_seed(self.cfg.train.seed, step, self.topo.pp_rank))
                self.engine.train_batch(micro_batches)
            else:
                count = len(batches)
                self.engine.eval_batch(
                    micro_batches, num_micro_batches=count, reduce_output=None, bcast_loss=False
                )
            return
        for micro, batch in enumerate(batches):
            inputs = self._to_device(self.objective.model_inputs(batch))  # targets found on the host
            batch = self._to_device(batch)
            if train:
                torch.manual_seed(_dropout_seed(self.cfg.train.seed, step, micro))
                capture = self.distillation.capture() if self.distillation else None
                if capture is not None:  # what the distillation losses read inside the student
                    inputs["capture"] = capture
                self.engine.backward(self.totals(self.engine(**inputs), batch))
                self.engine.step()
            else:
                self.totals(self.engine(**inputs), batch)

    def train_step(self, step: int) -> dict[str, float]:
        # Every rank reads its data-parallel slice (a middle pipeline stage only counts its targets).
        batches = self.train_data.micro_batches(step, self.accumulation)
        local_counts = Counter()  # update, not +: a term without targets on this rank keeps its key
        for batch in batches:
            local_counts.update(self._target_counts(batch))
        names = list(local_counts)
        counts = dict(
            zip(names, all_reduce_sum([local_counts[n] for n in names], self.reports_loss), strict=True)
        )
        # DeepSpeed averages over micro-batches and data-parallel ranks; undo that so that the gradient is
        # the sum over terms of d(term sum) / the term's global count.
        dp_micro = self.accumulation * self.topo.dp_size
        self.totals.start({name: dp_micro / max(count, 1) for name, count in counts.items()})
        self._run(batches, step, train=True)
        sums, _, correct = self.totals.reduced(names, self.reports_loss)
        grad_norm = self.engine.get_global_grad_norm()
        return term_metrics(sums, counts, correct) | {
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": self.scheduler.get_last_lr()[0],
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The objective's loss terms and target accuracy on a fixed slice of the held-out split (fixed
        masks; a token stream, so the pair objectives score their MLM term)."""
        self.engine.eval()
        # `eval_batches` global batches: the same held-out sequences whatever the layout
        batches = self.valid_data.micro_batches(0, self.cfg.train.eval_batches * self.accumulation)
        self.totals.start({}, count_correct=True)
        self._run(batches, 0, train=False)
        self.engine.train()
        breakdown = self.objective.breakdown_terms
        names = list(self.objective.target_counts(batches[0])) + list(breakdown)
        return term_metrics(*self.totals.reduced(names, self.reports_loss), breakdown)

    def run(self) -> Path | None:
        cfg, topo = self.cfg, self.topo
        start = checkpoint.resume(self.engine, self.checkpoints, cfg)
        if topo.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.output / "config.yaml")
        logger = MetricsLogger(self.output, topo.is_main, start, cfg.train.train_steps)
        tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_length
        flops = model_flops_per_token(cfg) * tokens_per_step
        # hardware FLOPs count the forward passes that activation checkpointing repeats
        hardware_flops = hardware_flops_per_token(cfg) * tokens_per_step
        peak = cfg.train.peak_flops * topo.world_size
        self.engine.train()
        window_start, window_steps = time.perf_counter(), 0
        evaluation = {}
        for step in range(start, cfg.train.train_steps):
            stats = self.train_step(step)
            done = step + 1
            try:
                stats |= self.guard.check(done, stats["loss"])
            except TrainingDiverged:
                logger.close()  # ends the progress bar's line before the error is printed
                raise
            window_steps += 1
            logger.advance()
            if done % cfg.train.log_interval == 0 or done == cfg.train.train_steps:
                elapsed = time.perf_counter() - window_start
                stats["tokens_per_s"] = tokens_per_step * window_steps / elapsed
                stats["flops_per_s"] = flops * window_steps / elapsed
                stats["mfu"] = stats["flops_per_s"] / peak
                if cfg.train.activation_checkpointing:
                    stats["hfu"] = hardware_flops * window_steps / elapsed / peak
                logger.log("train", done, stats)
                window_start, window_steps = time.perf_counter(), 0
            if done % cfg.train.eval_interval == 0 or done == cfg.train.train_steps:
                evaluation = self.evaluate()
                logger.log("eval", done, evaluation)
            saving = done % cfg.train.save_interval == 0 or done == cfg.train.train_steps
            if saving and not self.guard.skipping:
                checkpoint.save(
                    self.engine, self.checkpoints, done, cfg, cfg.train.keep_checkpoints, topo.is_main
                )
        logger.close()
        return self._write_model_dir(max(start, cfg.train.train_steps), evaluation or self.evaluate())

    def _write_model_dir(self, steps: int, evaluation: dict[str, float]) -> Path | None:
        """Consolidates the sharded weights into one unsharded model directory (rank 0 writes)."""
        state = {
            k: v for k, v in full_state_dict(self.model).items() if not k.startswith(f"{DISTILL_MODULES}.")
        }
        out = None
        if self.topo.is_main:
            meta = {
                "step": steps,
                "tokens": steps * self.cfg.train.global_batch_size * self.cfg.data.seq_length,
                "valid": evaluation,
            }
            out = model_dir.save_model_dir(
                self.output / "model", state, self.cfg, self.manifest_tokenizer, meta
            )
            print(json.dumps({"model_dir": str(out), **meta}))
        dist.barrier()
        return out
