"""Run on 4 processes: the bytes each rank holds for weights, gradients and optimizer state under ZeRO 0-3,
counted from every live tensor, next to plmscale.plan's estimate, at TP 1 x DP 4, TP 2 x DP 2 and TP 4 x DP 1
in fp32, and ZeRO-1/2 at TP 2 x DP 2 in bf16; and the parameters a TP=2 rank of a BERT with its pair head holds.

    python -m torch.distributed.run --nproc_per_node 4 tests/dist/model_state_bytes.py OUT.json

The count is taken after the backward pass of a micro-step that is not the last of its step (gradients
accumulating, optimizer state created by the step before), when activations are gone: what the GPU holds
under the next micro-batch's activations. DeepSpeed's gradient-reduction bucket is a buffer, not a model
state; it is set to a small size here (the planner reports it apart).
"""

import gc
import json
import sys
import tempfile
import warnings
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from plmscale.config import REPO_ROOT, RunConfig, load_deepspeed_json
from plmscale.objectives import get_objective
from plmscale.parallel.distributed import DeepSpeedMPU, init_distributed
from plmscale.parallel.tensor_parallel import build_parallel_model
from plmscale.plan.estimate import model_state_bytes, stage_numels
from plmscale.training.guard import guarded_optimizer
from plmscale.training.trainer import _param_groups

BUCKET = 10_000  # elements of DeepSpeed's reduction bucket (shipped configs: 5e7)
PERSISTENCE = 2_000  # ZeRO-3 keeps tensors up to this size whole: here the vectors, not the matrices
MICRO, ACCUMULATION = 2, 2


def recipe(ds_config: str, precision: str, world: int, tensor_parallel: int = 1, **model) -> RunConfig:
    return RunConfig.model_validate({
        "model": {"kind": "decoder", "vocab_size": 1000, "hidden_size": 64, "num_layers": 6, "num_heads": 4,
                  "max_position_embeddings": 32, "hidden_dropout": 0.0, "attention_dropout": 0.0} | model,
        "data": {"shards": "unused", "seq_length": 32},
        "objective": {"name": "causal_lm" if model.get("kind", "decoder") == "decoder" else "mlm"},
        "parallel": {"tensor_parallel": tensor_parallel},
        "optimizer": {"lr": 1e-3, "warmup_steps": 1},
        "train": {"deepspeed_config": ds_config, "micro_batch_size": MICRO, "precision": precision,
                  "global_batch_size": MICRO * ACCUMULATION * world // tensor_parallel, "train_steps": 10,
                  "output_dir": "unused"},
    })  # fmt: skip


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage alive in this process (a storage shared by views counted once)."""
    gc.collect()
    storages = {}
    with warnings.catch_warnings():  # isinstance() on deprecated module attributes warns
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in tensors:
        for tensor in (obj, obj.grad):
            if tensor is None or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            if storage.data_ptr():
                storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(storages.values())


def measure(cfg: RunConfig, world: int) -> tuple[int, int]:
    """(bytes held at the measuring point, bytes still held once the engine is gone)."""
    objective = get_objective("causal_lm", {}, cfg.model)
    baseline = live_tensor_bytes()
    torch.manual_seed(0)
    model = build_parallel_model(cfg.model)
    param_groups, mpu = _param_groups(model, cfg.optimizer.weight_decay), DeepSpeedMPU()
    engine = deepspeed.initialize(  # as the trainer does (ZeRO-0 fp32: plmscale's guarded AdamW)
        model=model,
        model_parameters=param_groups,
        optimizer=guarded_optimizer(cfg, param_groups, mpu),
        config=cfg.deepspeed_config(world),
        mpu=mpu,
    )[0]
    generator = torch.Generator().manual_seed(parallel_state.get_data_parallel_rank())
    for micro in range(ACCUMULATION + 1):  # a whole step, then the first micro-step of the next
        ids = torch.randint(0, cfg.model.vocab_size, (MICRO, cfg.data.seq_length + 1), generator=generator)
        batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
        loss_sum, count = objective.loss(engine(**objective.model_inputs(batch)), batch, model.spec)
        engine.backward(loss_sum / count)
        del loss_sum
        if micro < ACCUMULATION:
            engine.step()
    held = live_tensor_bytes() - baseline
    engine.destroy()  # removes DeepSpeed's hooks, which would keep this engine's tensors alive
    del engine, model, param_groups
    return held, live_tensor_bytes() - baseline


def zero_config(directory: str, stage: int) -> str:
    ds = load_deepspeed_json(str(REPO_ROOT / "ds_configs" / f"zero{stage}.json"))
    ds["zero_optimization"] |= {"reduce_bucket_size": BUCKET}
    if stage == 3:
        ds["zero_optimization"] |= {"stage3_param_persistence_threshold": PERSISTENCE}
    path = Path(directory) / f"zero{stage}.json"
    path.write_text(json.dumps(ds))
    return str(path)


def main() -> None:
    out = Path(sys.argv[1])
    report = {"states": [], "tensor_parallel": []}
    with tempfile.TemporaryDirectory() as tmp:
        for tp in (1, 2, 4):
            if parallel_state.model_parallel_is_initialized():
                parallel_state.destroy_model_parallel()
            topo = init_distributed(tp)
            runs = [("fp32", stage) for stage in range(4)]
            if tp == 2:
                runs += [("bf16", 1), ("bf16", 2)]
            for precision, stage in runs:
                cfg = recipe(zero_config(tmp, stage), precision, topo.world_size, tensor_parallel=tp)
                held, left = measure(cfg, topo.world_size)
                numels = stage_numels(cfg.model, tp, cfg.model.num_layers, embeddings=True, head=True)
                estimate = model_state_bytes(
                    numels, stage, topo.dp_size, precision == "bf16", False, PERSISTENCE
                )
                rows = [None] * topo.world_size
                dist.all_gather_object(rows, (held, left))
                report["states"].append(
                    {"tp": tp, "dp": topo.dp_size, "precision": precision, "zero": stage,
                     "params": sum(numels), "held": [h for h, _ in rows], "left": [x for _, x in rows],
                     "estimate": estimate.total}
                )  # fmt: skip
            if tp == 2:
                cfg = recipe(zero_config(tmp, 1), "fp32", 1, kind="encoder", pair_head=True)
                local = sum(p.numel() for p in build_parallel_model(cfg.model).parameters())
                estimate = sum(stage_numels(cfg.model, tp, cfg.model.num_layers, embeddings=True, head=True))
                report["tensor_parallel"].append({"kind": "encoder", "local": local, "estimate": estimate})
    if dist.get_rank() == 0:
        out.write_text(json.dumps(report, indent=1))
    dist.barrier()


if __name__ == "__main__":
    main()
