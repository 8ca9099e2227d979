"""`prep` commands: corpus, tokenizer, shards, instances, stats, task. The top-level `plmscale` CLI mounts them with
`add_prep_parser(subparsers)`; `python -m data_prep.cli prep ...` runs them alone.

    python -m data_prep.cli prep corpus --out data/corpus.jsonl
    python -m data_prep.cli prep tokenizer --input data/corpus.jsonl --out data/tokenizer --vocab-size 8000
    python -m data_prep.cli prep shards --input data/corpus.jsonl --tokenizer data/tokenizer/tokenizer.model
    python -m data_prep.cli prep instances --shards data/shards --objective nsp --out data/instances/nsp
    python -m data_prep.cli prep stats data/instances/nsp
    python -m data_prep.cli prep task --corpus data/corpus.jsonl --out data/task_package
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

from data_prep import UserError
from data_prep.inputs import check_inputs
from plmscale.arguments import fraction, positive


class _HelpWithParams(argparse.Action):
    """-h of `prep instances`: the help, then each objective's --param keys and defaults. They are read off
    the instance types, whose import pulls in megatron-core, so only when the help is asked for."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(
            option_strings,
            dest=argparse.SUPPRESS,
            default=argparse.SUPPRESS,
            nargs=0,
            help="show this help message, with each objective's --param keys, and exit",
        )

    def __call__(self, parser, namespace, values, option_string=None):
        from data_prep.instances.base import params_help

        parser.epilog = params_help()
        parser.print_help()
        parser.exit()


def _user_errors(command):
    """A user's mistake ends the command with one line on stderr and exit code 2, no traceback."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> None:
        try:
            command(args)
        except UserError as exc:
            print(f"plmscale prep {args.prep_command}: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None

    return run


def _print_rejected(rejected: dict, skipped: list[dict]) -> None:
    for reason, entry in rejected.items():
        first = ", ".join(
            e["file"] + ("" if e["line"] is None else f":{e['line']}") for e in entry["examples"][:2]
        )
        print(f"  rejected {reason}: {entry['count']} (first: {first})")
    for reason in sorted({entry["reason"] for entry in skipped}):
        paths = [entry["path"] for entry in skipped if entry["reason"] == reason]
        print(f"  skipped {reason}: {len(paths)} (first: {', '.join(paths[:2])})")


@_user_errors
def run_corpus(args: argparse.Namespace) -> None:
    from data_prep.corpus import write_corpus

    stats = write_corpus(args.out, max_mb=args.max_mb, min_chars=args.min_chars)
    capped = " (capped by --max-mb)" if stats["capped"] else ""
    print(
        f"corpus: {stats['documents']} documents, {stats['bytes'] / 1e6:.2f} MB{capped} "
        f"from {stats['files']} stdlib files -> {args.out}"
    )


@_user_errors
def run_tokenizer(args: argparse.Namespace) -> None:
    check_inputs(args.input)
    from data_prep.tokenizer import train_tokenizer  # slow imports, after the quick checks

    sidecar = train_tokenizer(
        args.input,
        args.out,
        text_field=args.text_field,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        input_sentence_size=args.input_sentence_size,
        character_coverage=args.character_coverage,
        num_threads=args.threads,
        seed=args.seed,
    )
    counts = sidecar["counts"]
    print(
        f"tokenizer: {args.model_type} vocab {sidecar['vocab_size']} from {counts['documents_used']} "
        f"documents, {counts['sentences']} sentences in {sidecar['seconds']:.1f}s -> {args.out}/tokenizer.model"
    )
    _print_rejected(sidecar["rejected"], sidecar["skipped"])


@_user_errors
def run_shards(args: argparse.Namespace) -> None:
    check_inputs(args.input)
    tokenizer = args.tokenizer / "tokenizer.model" if args.tokenizer.is_dir() else args.tokenizer
    if not tokenizer.is_file():
        raise UserError(f"tokenizer not found: {tokenizer} (train one with `plmscale prep tokenizer`)")
    from data_prep.shards import build_shards  # slow imports, after the quick checks

    manifest = build_shards(
        args.input,
        tokenizer,
        args.out,
        text_field=args.text_field,
        workers=args.workers,
        valid_fraction=args.valid_fraction,
        shard_tokens=args.shard_tokens,
        chunk_documents=args.chunk_documents,
        progress=not args.no_progress,
    )
    counts, splits = manifest["counts"], manifest["splits"]
    print(
        f"shards: {counts['documents_written']}/{counts['documents_in']} documents, {counts['sentences']} "
        f"sentences, {counts['tokens']} tokens in {manifest['seconds']:.1f}s "
        f"({counts['tokens'] / max(manifest['seconds'], 1e-9):,.0f} tokens/s, {args.workers} workers)"
    )
    for split, shards in splits.items():
        print(f"  {split}: {len(shards)} shards, {sum(s['tokens'] for s in shards)} tokens")
    _print_rejected(manifest["rejected"], manifest["skipped"])
    print(f"  -> {manifest['directory']}/manifest.json")


def _params(items: list[str]) -> dict[str, str]:
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--param {item!r} must look like key=value")
        params[key] = value
    return params


@_user_errors
def run_instances(args: argparse.Namespace) -> None:
    from data_prep.instances.build import build_instances  # slow imports, after the quick checks
    from plmscale.manifest import ManifestError

    params = _params(args.param)
    if args.entities:
        params["entities"] = str(args.entities)
    try:
        manifest = build_instances(
            args.shards,
            args.objective,
            args.out,
            params=params,
            dupe_factor=args.dupe_factor,
            seed=args.seed,
            workers=args.workers,
            split=args.split,
            docs_per_task=args.docs_per_task,
            progress=not args.no_progress,
        )
    except ManifestError as exc:
        raise UserError(str(exc)) from None
    counts, seconds = manifest["counts"], manifest["seconds"]
    kept = f", {manifest['tasks_kept']} finished tasks kept" if manifest["tasks_kept"] else ""
    print(
        f"instances: {counts['instances']} {args.objective} instances, {counts['tokens']} tokens from "
        f"{counts['documents_in'] // args.dupe_factor} documents x {args.dupe_factor} in {seconds:.1f}s ({counts['instances'] / max(seconds, 1e-9):,.0f} "
        f"instances/s, {counts['tokens'] / max(seconds, 1e-9):,.0f} tokens/s, {args.workers} workers{kept})"
    )
    for reason, count in counts["rejected"].items():
        print(f"  rejected {reason}: {count}")
    print(f"  -> {manifest['directory']}/manifest.json")


@_user_errors
def run_task(args: argparse.Namespace) -> None:
    from data_prep.task import write_package_task

    result = write_package_task(args.corpus, args.out, args.packages, args.dev_fraction, args.min_chars)
    counts = result["counts"]
    print(
        f"task: which package, {len(result['labels'])} classes ({', '.join(result['labels'])}); "
        f"{counts['train']['examples']} train, {counts['dev']['examples']} dev (balanced) -> {args.out}"
    )


@_user_errors
def run_stats(args: argparse.Namespace) -> None:
    from data_prep.instances.stats import format_table, instance_statistics
    from plmscale.data.instances import InstanceSetError

    try:
        stats = instance_statistics(args.directory, max_instances=args.max_instances)
    except InstanceSetError as exc:
        raise UserError(str(exc)) from None
    print(format_table(stats))


def _add_input_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input",
        nargs="+",
        default=["data/corpus.jsonl"],
        help="files (.jsonl and .txt, each also .gz/.zst/.bz2/.xz; .parquet) or directories, incl. "
        "`save_to_disk` datasets",
    )
    parser.add_argument("--text-field", default="text", help="the text column of JSONL, parquet and datasets")


def add_prep_parser(subparsers) -> argparse.ArgumentParser:
    """Register `prep {corpus,tokenizer,shards,instances,stats}` on an argparse subparsers object; each sets `func`."""
    prep = subparsers.add_parser(
        "prep", help="offline data preparation: corpus, tokenizer, shards, instances, task"
    )
    commands = prep.add_subparsers(dest="prep_command", required=True)

    corpus = commands.add_parser("corpus", help="write the embedded corpus (stdlib docstrings) as JSONL")
    corpus.add_argument("--out", type=Path, default=Path("data/corpus.jsonl"))
    corpus.add_argument("--max-mb", type=positive(float), default=64.0, help="size cap of the output")
    corpus.add_argument("--min-chars", type=positive(int), default=200, help="shortest docstring kept")
    corpus.set_defaults(func=run_corpus)

    tokenizer = commands.add_parser("tokenizer", help="train the SentencePiece tokenizer")
    _add_input_args(tokenizer)
    tokenizer.add_argument("--out", type=Path, default=Path("data/tokenizer"), help="output directory")
    tokenizer.add_argument(
        "--vocab-size", type=positive(int), default=8000, help="at most ~10k for the embedded corpus"
    )
    tokenizer.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram")
    tokenizer.add_argument(
        "--input-sentence-size",
        type=positive(int),
        default=2_000_000,
        help="sentences sampled for training (bounds memory)",
    )
    tokenizer.add_argument("--character-coverage", type=float, default=0.9995)
    tokenizer.add_argument(
        "--threads",
        type=positive(int),
        default=1,
        help="training threads; the model is reproducible for a given count",
    )
    tokenizer.add_argument("--seed", type=int, default=0, help="seed of the sentence sample")
    tokenizer.set_defaults(func=run_tokenizer)

    shards = commands.add_parser("shards", help="tokenize into megatron-core indexed dataset shards")
    _add_input_args(shards)
    shards.add_argument(
        "--tokenizer",
        type=Path,
        default=Path("data/tokenizer/tokenizer.model"),
        help="the SentencePiece model, or the directory `prep tokenizer` wrote it to",
    )
    shards.add_argument("--out", type=Path, default=Path("data/shards"), help="output directory")
    shards.add_argument("--workers", type=positive(int), default=os.cpu_count() or 1)
    shards.add_argument("--valid-fraction", type=fraction, default=0.01, help="held-out share of documents")
    shards.add_argument("--shard-tokens", type=positive(int), default=50_000_000, help="tokens per shard")
    shards.add_argument(
        "--chunk-documents", type=positive(int), default=256, help="documents per worker task"
    )
    shards.add_argument("--no-progress", action="store_true", help="no progress bar")
    shards.set_defaults(func=run_shards)

    instances = commands.add_parser(
        "instances",
        help="pre-mask training instances from the shards",
        add_help=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    instances.add_argument("-h", "--help", action=_HelpWithParams)
    instances.add_argument("--shards", type=Path, default=Path("data/shards"), help="`prep shards` output")
    instances.add_argument("--objective", required=True, help="mlm, nsp, sop, wwm, wwm_zh, span, ernie, ...")
    instances.add_argument(
        "--param", action="append", default=[], metavar="KEY=VALUE", help="an instance-type parameter"
    )
    instances.add_argument("--dupe-factor", type=positive(int), default=1, help="maskings of each document")
    instances.add_argument("--workers", type=positive(int), default=os.cpu_count() or 1)
    instances.add_argument("--seed", type=int, default=1234)
    instances.add_argument(
        "--entities",
        type=Path,
        help="the entity list, one entity a line: required by objective ernie (and --param masking=ernie)",
    )
    instances.add_argument("--split", default="train", help="the shards' split to instance")
    instances.add_argument("--docs-per-task", type=positive(int), default=2000, help="documents per task")
    instances.add_argument("--out", "--output", type=Path, required=True, help="output directory")
    instances.add_argument("--no-progress", action="store_true", help="no progress bar")
    instances.set_defaults(func=run_instances)

    task = commands.add_parser(
        "task", help="a fine-tuning task from the corpus: which stdlib package a docstring paragraph is from"
    )
    task.add_argument("--corpus", type=Path, default=Path("data/corpus.jsonl"), help="`prep corpus` output")
    task.add_argument("--out", type=Path, default=Path("data/task_package"), help="output directory")
    task.add_argument("--packages", type=positive(int), default=8, help="classes: the most frequent packages")
    task.add_argument("--dev-fraction", type=fraction, default=0.2, help="share of docstrings held out")
    task.add_argument("--min-chars", type=positive(int), default=40, help="shortest paragraph kept")
    task.set_defaults(func=run_task)

    stats = commands.add_parser("stats", help="statistics of an instance set")
    stats.add_argument("directory", type=Path, help="`prep instances` output")
    stats.add_argument("--max-instances", type=positive(int), default=200_000, help="read at most this many")
    stats.set_defaults(func=run_stats)
    return prep


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data_prep.cli")
    add_prep_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
