"""`plmscale distill-cache`: run a distillation recipe's teacher once over the samples the run will train on,
and keep its top-k logits at every target (plmscale/distill/cache.py), for `distill.teacher_cache`.

    plmscale distill-cache --config launch/recipes/bert_tiny_distill.yaml --top-k 32 --output runs/demo/top32
    deepspeed --no_local_rank --num_gpus 8 --module plmscale.cli distill-cache --config RECIPE --top-k 32 \\
        --output DIR --tensor-parallel 2     # 4 data-parallel groups share the chunks, the teacher cut in 2 in each

The teacher runs in the recipe's precision (train.precision); under the deepspeed launcher the chunks are
dealt round-robin to the data-parallel groups, rank 0 of each tensor-parallel group writing them, and rank 0
writes the manifest last, once every chunk is on disk.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from plmscale import model_dir
from plmscale.arguments import positive
from plmscale.config import ConfigError, RunConfig, load_config
from plmscale.data.sources import sample_order
from plmscale.distill.cache import DTYPES, FORMAT, chunk_name, fingerprints, recipe_fields
from plmscale.manifest import MANIFEST, write_manifest
from plmscale.objectives import IGNORE_INDEX, get_objective
from plmscale.tokenizer import file_sha256


def add_distill_cache_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "distill-cache",
        help="cache a distillation recipe's teacher's top-k logits over its training samples",
        description="Run the recipe's distill.teacher over the samples its run trains on and write the "
        "top-k logits at each target, for distill.teacher_cache.",
    )
    parser.add_argument("--config", required=True, help="the distillation recipe YAML")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.add_argument("--output", required=True, help="cache directory to write")
    parser.add_argument("--top-k", type=positive(int), required=True, help="logits kept per target")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float16", help="of the logits kept")
    parser.add_argument(
        "--steps", type=positive(int), help="training steps to cover (default: the recipe's train_steps)"
    )
    parser.add_argument(
        "--chunk-samples", type=positive(int), default=4096, help="samples per chunk file (default 4096)"
    )
    parser.add_argument(
        "--tensor-parallel", type=positive(int), default=1, help="under the deepspeed launcher"
    )
    parser.set_defaults(func=_run)
    return parser


def _checked_recipe(args: argparse.Namespace) -> tuple[RunConfig, dict]:
    """The recipe with its data and teacher checked, as for the run it serves (before any process group)."""
    from plmscale.preflight import check_data, check_teacher

    cfg = load_config(args.config, args.overrides)
    try:
        if cfg.distill is None:
            raise ConfigError("`plmscale distill-cache` needs a `distill:` section naming the teacher")
        cfg = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"teacher_cache": None})})
        shards = check_data(cfg, verify=cfg.data.verify_checksums)
        check_teacher(cfg, shards)
        vocab = model_dir.load_run_config(cfg.distill.teacher).model.padded_vocab_size
        if args.top_k > vocab:
            raise ConfigError(f"--top-k={args.top_k} exceeds the teacher's (padded) vocabulary of {vocab}")
    except ConfigError as err:
        raise ConfigError(f"{args.config}: {err}") from None
    return cfg, shards


def _run(args: argparse.Namespace) -> None:
    cfg, shards = _checked_recipe(args)
    steps = args.steps or cfg.train.train_steps
    teacher_cfg = model_dir.load_run_config(cfg.distill.teacher).model
    state = model_dir.load_state(cfg.distill.teacher)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        from plmscale.parallel.distributed import init_distributed
        from plmscale.parallel.state_dict import load_full_state_dict
        from plmscale.parallel.tensor_parallel import build_parallel_model

        topo = init_distributed(args.tensor_parallel)
        teacher = build_parallel_model(teacher_cfg)
        load_full_state_dict(teacher, state)
        dp_rank, dp_size, writes = topo.dp_rank, topo.dp_size, topo.tp_rank == 0
    else:
        if args.tensor_parallel > 1:
            raise ConfigError("--tensor-parallel needs the deepspeed launcher (one process per rank)")
        from plmscale.model import build_model

        teacher = build_model(teacher_cfg)
        teacher.load_state_dict(state)
        dp_rank, dp_size, writes = 0, 1, True
    from plmscale.parallel.distributed import device

    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    teacher.to(device=device(), dtype=dtype)
    if int(os.environ.get("RANK", "0")) == 0:  # a directory with a manifest holds a finished cache
        (Path(args.output) / MANIFEST).unlink(missing_ok=True)
    files = write_chunks(
        cfg, teacher, args.output, args.top_k, DTYPES[args.dtype], steps, args.chunk_samples, dp_rank, dp_size,
        writes,
    )  # fmt: skip
    if distributed:
        import torch.distributed as dist

        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, files)
        files = {name: record for part in gathered for name, record in part.items()}
        if dist.get_rank() != 0:
            return
    write_cache_manifest(cfg, shards, args.output, files, args.top_k, args.dtype, steps, args.chunk_samples)
    print(f"teacher cache {args.output}: {steps} steps, top {args.top_k}", file=sys.stderr)


@torch.no_grad()
def write_chunks(
    cfg: RunConfig,
    teacher: torch.nn.Module,
    directory: str | Path,
    top_k: int,
    dtype: torch.dtype,
    steps: int,
    chunk_samples: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    writes: bool = True,
) -> dict[str, dict]:
    """This data-parallel rank's chunks of the first `steps` x global-batch positions; returns each
    written file's sha256 and rows."""
    objective = get_objective(cfg.objective.name, cfg.objective.params, cfg.model)
    source = sample_order(cfg, objective, cfg.data.train_split, shuffle=True)
    samples = steps * cfg.train.global_batch_size
    out, files = Path(directory), {}
    out.mkdir(parents=True, exist_ok=True)
    on = next(teacher.parameters()).device
    teacher.eval()
    for chunk in range(dp_rank, -(-samples // chunk_samples), dp_size):
        first, end = chunk * chunk_samples, min((chunk + 1) * chunk_samples, samples)
        ids, logits, prints, counts = [], [], [], [0]
        for start in range(first, end, cfg.train.micro_batch_size):
            batch = source.batch(range(start, min(start + cfg.train.micro_batch_size, end)))
            inputs = {k: v.to(on) for k, v in objective.model_inputs(batch).items()}
            rows = teacher.spec.gather_logits(teacher(**inputs)).flatten(0, -2)
            top = rows.float().topk(top_k, dim=-1)
            ids.append(top.indices.to(torch.int32).cpu())
            logits.append(top.values.to(dtype).cpu())
            prints += fingerprints(batch)
            counts += (batch["labels"] != IGNORE_INDEX).sum(-1).tolist()
        if writes:
            name = chunk_name(chunk)
            save_file(
                {
                    "offsets": torch.tensor(counts, dtype=torch.int64).cumsum(0),
                    "ids": torch.cat(ids).contiguous(),
                    "logits": torch.cat(logits).contiguous(),
                    "fingerprints": torch.tensor(prints, dtype=torch.int64),
                },
                str(out / name),
            )
            files[name] = {"sha256": file_sha256(out / name), "rows": sum(counts)}
    return files


def write_cache_manifest(
    cfg: RunConfig,
    shards: dict,
    directory: str | Path,
    files: dict[str, dict],
    top_k: int,
    dtype: str,
    steps: int,
    chunk_samples: int,
) -> None:
    write_manifest(
        directory,
        {
            "format": FORMAT,
            "recipe": recipe_fields(cfg, shards),
            "top_k": top_k,
            "dtype": dtype,
            "teacher_precision": cfg.train.precision,
            "samples": steps * cfg.train.global_batch_size,
            "steps": steps,
            "global_batch_size": cfg.train.global_batch_size,
            "chunk_samples": chunk_samples,
            "targets": sum(record["rows"] for record in files.values()),
            "files": {name: files[name]["sha256"] for name in sorted(files)},
        },
    )
