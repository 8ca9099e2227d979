"""How close `prep shards` and `prep instances` come to their limit, raw SentencePiece batch encoding in the
same N processes, and how Megatron-LM's `tools/preprocess_data.py` does on the same input.

Same corpus (the embedded one, repeated to --mb and streamed to disk), same tokenizer, same worker count.
Each side runs in its own subprocess so that its peak RSS, main process and largest worker, is its own; the
fastest of --repeat runs counts. `raw` does what an ideal tool would: the main process only reads chunks of
256 JSONL lines, at most two per worker in flight, and the workers parse and batch-encode them; nothing is
split or written, and memory stays flat whatever the corpus size. `prep instances` (BERT-style,
max_seq_length 128, dupe factor 1) reads the shards the `shards` side wrote, for each of --objectives.
Megatron-LM's time is its whole script's, imports (torch) included: a fixed cost that a large corpus hides.
The RSS target is on the largest single process of `shards` and `instances`. A run needs a few times the
corpus size free on disk (corpus, shards, Megatron's output, one instances output at a time).

    python benchmarks/bench_prep.py --mb 20 --workers 2
    python benchmarks/bench_prep.py --mb 2200 --repeat 1 --keep /data/bench_prep   # > 2 GiB: the RSS target
    python benchmarks/bench_prep.py --megatron ~/src/Megatron-LM                     # adds Megatron-LM's script
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import deque
from itertools import islice
from multiprocessing import Pool
from pathlib import Path

CHUNK = 256
GIB = 1024**3
SHARDS_TARGET = 1.3  # shards wall time / raw wall time
MEGATRON_SCRIPT = Path("tools") / "preprocess_data.py"
MEGATRON_HELP = (
    "root of a Megatron-LM checkout: its tools/preprocess_data.py tokenizes the same corpus (--json-keys "
    "text, --tokenizer-type SentencePieceTokenizer, the same model and --workers, --append-eod; document "
    "level, as --split-sentences would need nltk and its punkt data) with this Python, which must import "
    "the checkout's megatron.training and megatron.core (torch, numpy, packaging, sentencepiece and the "
    "checkout's other requirements). Skipped when not given"
)


def _load(model: str) -> None:
    global _sp
    import sentencepiece as spm

    _sp = spm.SentencePieceProcessor(model_file=model)


def _encode_lines(lines: list[bytes]) -> int:
    texts = [json.loads(line)["text"] for line in lines]
    return sum(map(len, _sp.encode(texts, out_type=int, num_threads=1)))


def _bounded_map(pool: Pool, fn, items, in_flight: int):
    """fn over items in the pool, with at most `in_flight` submitted and not collected (`imap` reads all)."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def raw(corpus: Path, model: str, workers: int) -> dict:
    """The limit: read JSONL lines, parse and batch-encode them in the workers; no splitting or writing."""
    with corpus.open("rb") as lines, Pool(workers, _load, (model,)) as pool:
        chunks = iter(lambda: list(islice(lines, CHUNK)), [])
        started = time.perf_counter()
        tokens = sum(_bounded_map(pool, _encode_lines, chunks, in_flight=2 * workers))
        return {"tokens": tokens, "seconds": time.perf_counter() - started}


def shards(corpus: Path, model: str, workers: int) -> dict:
    from data_prep.shards import build_shards

    out = corpus.parent / "shards"
    started = time.perf_counter()
    manifest = build_shards([corpus], model, out, workers=workers, progress=False)
    return {"tokens": manifest["counts"]["tokens"], "seconds": time.perf_counter() - started}


def instances(corpus: Path, workers: int, objective: str) -> dict:
    from data_prep.instances.build import build_instances

    out = corpus.parent / f"instances_{objective}"
    started = time.perf_counter()
    manifest = build_instances(corpus.parent / "shards", objective, out, workers=workers, progress=False)
    seconds = time.perf_counter() - started
    shutil.rmtree(out)  # a kept task would be a resumed run, not a measured one
    counts = manifest["counts"]
    return {"tokens": counts["tokens"], "instances": counts["instances"], "seconds": seconds}


def _run_as_main(script: Path, argv: list[str]) -> str | None:
    """Run `script` as `python script argv` would, in this process; return why it failed, or None."""
    sys.argv = [str(script), *argv]
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries this side's JSON line only
            runpy.run_path(str(script), run_name="__main__")
    except SystemExit as stop:
        return None if stop.code in (None, 0) else f"exit status {stop.code}"
    except Exception:
        traceback.print_exc()
        return traceback.format_exc().splitlines()[-1]
    return None


def megatron(corpus: Path, model: str, workers: int, checkout: Path) -> dict:
    """Megatron-LM's script, in this process rather than a child so that its main process and its workers
    are measured apart as the other sides' are; its tokens are counted from the .idx it wrote."""
    out = corpus.parent / "megatron"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    os.chdir(out)  # the script may look for --find-optimal-num-workers results in its working dir
    argv = ["--input", str(corpus), "--json-keys", "text", "--output-prefix", str(out / "corpus")]
    argv += ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model]
    # a long --log-interval: its stderr tail, shown if it fails, should be the error, not progress lines
    argv += ["--workers", str(workers), "--append-eod", "--log-interval", "100000"]
    started = time.perf_counter()
    failure = _run_as_main(checkout / MEGATRON_SCRIPT, argv)
    seconds = time.perf_counter() - started
    if not (out / "corpus_text_document.idx").exists():
        sys.exit(f"{MEGATRON_SCRIPT} wrote no corpus_text_document.idx ({failure or 'exit status 0'})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron-core warns that Transformer Engine and Apex are absent
        from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(out / "corpus_text_document"))  # kept: it unmaps the lengths when freed
    tokens = int(dataset.sequence_lengths.sum())
    return {"tokens": tokens, "seconds": seconds, "failure": failure}


def _peak_rss_mib() -> float:
    """This process's peak RSS (Linux). Not RUSAGE_SELF: ru_maxrss survives exec, so a side would also
    report the benchmark's own peak at the time it launched the side."""
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) / 1024


def run_phase(args: argparse.Namespace) -> None:
    """One side, in this (sub)process: print its figures and the peak RSS of this process and its children."""
    if args.phase == "raw":
        result = raw(args.corpus, args.model, args.workers)
    elif args.phase == "shards":
        result = shards(args.corpus, args.model, args.workers)
    elif args.phase == "megatron":
        result = megatron(args.corpus, args.model, args.workers, args.megatron)
    else:
        result = instances(args.corpus, args.workers, args.phase.removeprefix("instances:"))
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB, of the largest child
    print(json.dumps(result | {"rss_main_mib": _peak_rss_mib(), "rss_worker_mib": workers}))


def _phase(name: str, corpus: Path, model: str, args: argparse.Namespace) -> dict:
    """Run one side in a subprocess; its figures, or {"failed": the tail of its stderr}."""
    command = [sys.executable, os.path.abspath(__file__), "--phase", name, "--corpus", str(corpus)]
    command += ["--model", model, "--workers", str(args.workers)]
    if args.megatron:
        command += ["--megatron", str(args.megatron)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        return {"failed": "\n".join([*done.stderr.splitlines()[-15:], f"(exit status {done.returncode})"])}
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=20.0, help="corpus size: the embedded corpus repeated")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each side; the fastest is kept")
    parser.add_argument(
        "--objectives", nargs="*", default=["mlm", "wwm", "span"], help="`prep instances` objectives timed"
    )
    parser.add_argument("--megatron", type=Path, metavar="PATH", help=MEGATRON_HELP)
    parser.add_argument(
        "--keep", type=Path, metavar="DIR", help="work (corpus, tokenizer, outputs) in DIR and keep it"
    )
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.phase:
        run_phase(args)
        return
    if args.megatron:
        args.megatron = args.megatron.expanduser().resolve()
        if not (args.megatron / MEGATRON_SCRIPT).is_file():
            parser.error(f"--megatron {args.megatron}: no {MEGATRON_SCRIPT} there (a Megatron-LM checkout?)")
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        run(args.keep.resolve(), args)
        return
    with tempfile.TemporaryDirectory(prefix="bench_prep_") as work:
        run(Path(work), args)


def write_repeated_corpus(work: Path, mb: float) -> tuple[Path, dict]:
    """The embedded corpus, copied onto disk until about `mb` MB: never more than one copy in memory."""
    from data_prep.corpus import write_corpus  # not at the top: each side's RSS counts only its own imports

    stats = write_corpus(work / "stdlib.jsonl")
    once = (work / "stdlib.jsonl").read_bytes()
    corpus = work / "corpus.jsonl"
    with corpus.open("wb") as out:
        for _ in range(max(1, round(mb * 1e6 / len(once)))):
            out.write(once)
    return corpus, stats | {"once_bytes": len(once)}


def run(work: Path, args: argparse.Namespace) -> None:
    from data_prep.tokenizer import train_tokenizer

    corpus, stats = write_repeated_corpus(work, args.mb)
    size = corpus.stat().st_size
    tok = train_tokenizer([work / "stdlib.jsonl"], work / "tokenizer", vocab_size=args.vocab_size)
    print(
        f"corpus: {stats['documents']} docstrings, {stats['once_bytes'] / 1e6:.2f} MB, repeated to "
        f"{size / 1e6:.1f} MB ({size / GIB:.2f} GiB)"
    )
    print(f"tokenizer: unigram {args.vocab_size} trained in {tok['seconds']:.1f}s; workers: {args.workers}")
    if not args.megatron:
        print("megatron: skipped (no --megatron PATH to a Megatron-LM checkout given)")

    model = str(work / "tokenizer" / "tokenizer.model")
    names = ["raw", "shards", *(["megatron"] if args.megatron else [])]
    names += [f"instances:{objective}" for objective in args.objectives]
    best: dict[str, dict] = {}
    for _ in range(args.repeat):
        for name in names:
            if "failed" in best.get(name, {}):
                continue
            result = _phase(name, corpus, model, args)
            if "failed" in result and name != "megatron":
                sys.exit(f"{name} failed:\n{result['failed']}")
            if name not in best or "failed" in result or result["seconds"] < best[name]["seconds"]:
                best[name] = result
    if "failed" in best.get("megatron", {}):
        print(
            f"megatron: skipped, {MEGATRON_SCRIPT} failed; its stderr ends:\n{best.pop('megatron')['failed']}"
        )
    report(best, size)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(results: dict[str, dict], size: int) -> None:
    """The table, then each target with its figure and PASS/FAIL."""
    raw_seconds = results["raw"]["seconds"]
    print(
        f"\n{'side':<16}{'tokens':>12}{'wall s':>9}{'Mtok/s':>9}{'MB/s':>8}{'x raw time':>12}"
        f"{'RSS main MiB':>14}{'RSS worker MiB':>16}"
    )
    for name, r in results.items():
        print(
            f"{name:<16}{r['tokens']:>12}{r['seconds']:>9.2f}{r['tokens'] / r['seconds'] / 1e6:>9.2f}"
            f"{size / 1e6 / r['seconds']:>8.2f}{r['seconds'] / raw_seconds:>12.2f}"
            f"{r['rss_main_mib']:>14.0f}{r['rss_worker_mib']:>16.0f}"
        )
    print(
        "\ntokens differ by side: shards encodes sentences, megatron appends an EOD per document, instances "
        "count their own tokens (special tokens included)"
    )
    if results.get("megatron", {}).get("failure"):
        print(f"megatron: its script then failed after writing its output: {results['megatron']['failure']}")
    for name, r in results.items():
        if name.startswith("instances:"):
            print(f"{name}: {r['instances']:,} instances, {r['instances'] / r['seconds']:,.0f}/s")

    print("\ntargets")
    shards_ratio = results["shards"]["seconds"] / raw_seconds
    print(
        f"  shards time <= {SHARDS_TARGET} x raw: {shards_ratio:.2f} x  {verdict(shards_ratio <= SHARDS_TARGET)}"
    )
    for name, r in results.items():
        if name.startswith("instances:"):
            ratio = r["seconds"] / raw_seconds
            print(f"  {name} time <= raw: {ratio:.2f} x  {verdict(ratio <= 1)}")
    ours = {name: r for name, r in results.items() if name not in ("raw", "megatron")}
    peak, where = max(
        (r[f"rss_{process}_mib"], f"{name} {process}")
        for name, r in ours.items()
        for process in ("main", "worker")
    )
    corpus = (
        f"on a {size / GIB:.2f} GiB corpus, larger than 2 GiB"
        if size >= 2 * GIB
        else f"only demonstrated on a corpus > 2 GiB, this one is {size / GIB:.3f} GiB (try --mb 2200)"
    )
    print(f"  peak RSS < 2 GiB: {peak:.0f} MiB ({where})  {verdict(peak * 2**20 < 2 * GIB)}; {corpus}")


if __name__ == "__main__":
    main()
