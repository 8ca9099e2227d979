"""The training loop (pre-training and distillation), run once per process by the `deepspeed` launcher.

    deepspeed --num_gpus 2 -m plmscale.cli train --config launch/recipes/bert_tiny_demo.yaml

Every loss term is a (sum, count) pair; each step the global count of every term's targets is all-reduced
first, so the gradient is that of the sum over terms of sum / global count (one term for most objectives,
MLM + pair for BERT / ALBERT) however the targets fall across micro-batches and ranks.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from plmscale import model_dir
from plmscale.config import RunConfig, save_config
from plmscale.data import BatchSource, InstanceBatchSource, InstanceSet, PackedStream
from plmscale.data.instances import load_instance_manifest
from plmscale.data.loader import SampleOrder
from plmscale.distill import DistillationLoss, default_student_layers, student_state_from_teacher
from plmscale.distill.student import check_student_config
from plmscale.objectives import LossTerm, get_objective
from plmscale.parallel.distributed import DeepSpeedMPU, Topology, all_reduce_dp, device, init_distributed
from plmscale.parallel.state_dict import full_state_dict, load_full_state_dict
from plmscale.parallel.tensor_parallel import build_parallel_model
from plmscale.training import checkpoint
from plmscale.training.guard import DivergenceGuard, TrainingDiverged, guarded_optimizer, nonfinite_to_nan
from plmscale.training.metrics import MetricsLogger


def flops_per_token(cfg: RunConfig) -> float:
    """Forward + backward FLOPs per token: 6 N for the weights plus attention scores (PaLM appendix B)."""
    m = cfg.model
    weights = m.non_embedding_params() + m.hidden_size * m.padded_vocab_size
    return 6 * weights + 12 * m.num_layers * m.hidden_size * cfg.data.seq_length


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, LayerNorms and other vectors."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def term_metrics(sums: dict[str, float], counts: dict[str, float], correct: dict[str, float]) -> dict:
    """Global per-term totals -> metrics: `loss`, the sum of the terms' means (what is optimized), and the
    first term's `targets` and `accuracy`, as for one term; with several terms, each term's `loss/NAME` and
    `targets/NAME` too, and `NAME_accuracy` for another term whose hits were counted."""
    first, *others = counts
    means = {name: sums[name] / max(counts[name], 1) for name in counts}
    metrics = {"loss": sum(means.values()), "targets": counts[first]}
    if others:
        metrics |= {f"loss/{name}": mean for name, mean in means.items()}
        metrics |= {f"targets/{name}": counts[name] for name in others}
    for name, hits in correct.items():
        metrics["accuracy" if name == first else f"{name}_accuracy"] = hits / max(counts[name], 1)
    return metrics


def _all_reduce_totals(*totals: dict[str, float]) -> list[dict[str, float]]:
    """Per-term dicts, each summed over the data-parallel ranks (one all-reduce for all)."""
    values = all_reduce_dp([value for named in totals for value in named.values()])
    reduced, start = [], 0
    for named in totals:
        reduced.append(dict(zip(named, values[start : start + len(named)], strict=True)))
        start += len(named)
    return reduced


def _dropout_seed(seed: int, step: int, micro: int) -> int:
    """Dropout randomness is a function of the step, so a resumed run draws the same masks."""
    return (seed * 1_000_003 + step * 1_009 + micro) % (2**63)


class Trainer:
    def __init__(self, cfg: RunConfig, world_size: int):
        self.cfg = cfg
        self.accumulation = cfg.check_world(world_size)
        ds_config = cfg.deepspeed_config(world_size)
        self.topo: Topology = init_distributed(cfg.parallel.tensor_parallel)
        torch.manual_seed(cfg.train.seed)
        self.objective = get_objective(cfg.objective.name, cfg.objective.params, cfg.model)
        self.manifest_tokenizer = self._check_tokenizer()
        dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        self.model = build_parallel_model(cfg.model)
        self.distillation = self._set_up_distillation(dtype) if cfg.distill else None
        param_groups, mpu = _param_groups(self.model, cfg.optimizer.weight_decay), DeepSpeedMPU()
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.model,
            model_parameters=param_groups,
            optimizer=guarded_optimizer(cfg, param_groups, mpu),
            config=ds_config,
            mpu=mpu,
        )
        self.guard = DivergenceGuard(cfg.train, self.engine)
        self.device = device()
        self.train_data = self._batch_source(cfg.data.train_split, shuffle=True)
        self.valid_data = self._batch_source(cfg.data.valid_split, shuffle=False)
        self.output = Path(cfg.train.output_dir)
        self.checkpoints = self.output / "checkpoints"

    def _check_tokenizer(self) -> str:
        from data_prep.manifest import load_manifest

        manifest = load_manifest(self.cfg.data.shards, verify=self.cfg.data.verify_checksums)
        vocab = manifest["tokenizer"]["vocab_size"]
        if vocab != self.cfg.model.vocab_size:
            raise ValueError(
                f"model.vocab_size={self.cfg.model.vocab_size} but the shards' tokenizer has {vocab}"
            )
        if self.cfg.data.instances:
            instances = load_instance_manifest(self.cfg.data.instances, verify=False)
            if instances["tokenizer"]["sha256"] != manifest["tokenizer"]["sha256"]:
                raise ValueError(
                    f"data.instances={self.cfg.data.instances}: built with another tokenizer than the shards"
                )
            self.objective.check_instances(instances)  # if it was built after the config was checked
        return manifest["tokenizer"]["path"]

    def _batch_source(self, split: str, shuffle: bool) -> SampleOrder:
        t, data = self.cfg.train, self.cfg.data
        order = (t.micro_batch_size, self.topo.dp_size, self.topo.dp_rank, t.seed, shuffle)
        if data.instances and split == data.train_split:
            instances = InstanceSet(data.instances, verify=data.verify_checksums)
            return InstanceBatchSource(instances, data.seq_length, *order)
        stream = PackedStream.from_manifest(data.shards, split, verify=False)
        return BatchSource(stream, self.objective, data.seq_length, *order)

    def _set_up_distillation(self, dtype: torch.dtype) -> DistillationLoss:
        """Teacher built with the same tensor parallelism, student initialized from its layers."""
        d = self.cfg.distill
        teacher_cfg = model_dir.load_run_config(d.teacher).model
        layers = d.student_layers or default_student_layers(teacher_cfg.num_layers, self.cfg.model.num_layers)
        check_student_config(teacher_cfg, self.cfg.model, layers)
        teacher_state = model_dir.load_state(d.teacher)
        teacher = build_parallel_model(teacher_cfg)
        load_full_state_dict(teacher, teacher_state)
        load_full_state_dict(self.model, student_state_from_teacher(teacher_state, layers))
        teacher.to(device=device(), dtype=dtype)
        return DistillationLoss(teacher, self.objective, d.temperature, d.alpha)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _forward(self, batch: dict[str, torch.Tensor]):
        return self.engine(**self.objective.model_inputs(batch))

    def _train_terms(self, batch: dict[str, torch.Tensor]) -> dict[str, LossTerm]:
        outputs = self._forward(batch)
        if self.distillation:  # one term: config validation keeps pair objectives out of distillation
            return {self.objective.name: LossTerm(*self.distillation(outputs, batch, self.model.spec))}
        return self.objective.loss_terms(outputs, batch, self.model.spec)

    def train_step(self, step: int) -> dict[str, float]:
        batches = [self._to_device(b) for b in self.train_data.micro_batches(step, self.accumulation)]
        local_counts = Counter()  # update, not +: a term without targets on this rank keeps its key
        for batch in batches:
            local_counts.update(self.objective.target_counts(batch))
        (counts,) = _all_reduce_totals(local_counts)
        # DeepSpeed averages over micro-batches and data-parallel ranks; undo that so that the gradient is
        # the sum over terms of d(term sum) / the term's global count.
        dp_micro = self.accumulation * self.topo.dp_size
        scales = {name: dp_micro / max(count, 1) for name, count in counts.items()}
        sums, correct = dict.fromkeys(counts, 0.0), {}
        for micro, batch in enumerate(batches):
            torch.manual_seed(_dropout_seed(self.cfg.train.seed, step, micro))
            terms = self._train_terms(batch)
            loss = sum(term.sum * scales[name] for name, term in terms.items())
            self.engine.backward(nonfinite_to_nan(loss))
            self.engine.step()
            for name, term in terms.items():
                sums[name] += term.sum.item()
                if term.correct is not None:
                    correct[name] = correct.get(name, 0) + term.correct
        grad_norm = self.engine.get_global_grad_norm()
        global_sums, global_correct = _all_reduce_totals(sums, correct)
        return term_metrics(global_sums, counts, global_correct) | {
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": self.scheduler.get_last_lr()[0],
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The objective's loss terms and target accuracy on a fixed slice of the held-out split (fixed
        masks; a token stream, so the pair objectives score their MLM term)."""
        self.engine.eval()
        sums, counts, correct = Counter(), Counter(), Counter()
        for batch in self.valid_data.micro_batches(0, self.cfg.train.eval_batches):
            batch = self._to_device(batch)
            terms = self.objective.loss_terms(
                self._forward(batch), batch, self.model.spec, count_correct=True
            )
            for name, term in terms.items():
                sums[name] += term.sum.item()
                counts[name] += term.count
                correct[name] += term.correct
        self.engine.train()
        return term_metrics(*_all_reduce_totals(sums, counts, correct))

    def run(self) -> Path | None:
        cfg, topo = self.cfg, self.topo
        start = checkpoint.resume(self.engine, self.checkpoints, cfg)
        if topo.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.output / "config.yaml")
        logger = MetricsLogger(self.output, topo.is_main, start, cfg.train.train_steps)
        tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_length
        flops = flops_per_token(cfg) * tokens_per_step
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
        state = full_state_dict(self.model)
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
