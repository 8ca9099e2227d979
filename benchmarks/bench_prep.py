"""How close `prep shards` and `prep instances` come to their limit: raw SentencePiece batch encoding in the
same N processes.

Same corpus (the embedded one, repeated to --mb), same tokenizer, same worker count. Each side runs in
its own subprocess so that its peak RSS is its own; the fastest of --repeat runs counts. `prep instances`
(BERT-style, max_seq_length 128, dupe factor 1) reads the shards the `shards` side wrote, for each of the
--objectives; its ratio is tokenizing time / instancing time (>= 1: no slower than the tokenizer).

    python benchmarks/bench_prep.py --mb 20 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

CHUNK = 256
PHASES = ("raw", "shards")


def _encode(texts: list[str]) -> int:
    return sum(map(len, _sp.encode(texts, out_type=int, num_threads=1)))


def _load(model: str) -> None:
    global _sp
    import sentencepiece as spm

    _sp = spm.SentencePieceProcessor(model_file=model)


def raw(corpus: Path, model: str, workers: int) -> dict:
    """Documents already in memory, encoded whole: no reading, splitting or writing."""
    texts = [json.loads(line)["text"] for line in corpus.open()]
    chunks = [texts[i : i + CHUNK] for i in range(0, len(texts), CHUNK)]
    with Pool(workers, _load, (model,)) as pool:
        started = time.perf_counter()
        tokens = sum(pool.imap(_encode, chunks))
        return {"tokens": tokens, "seconds": time.perf_counter() - started}


def shards(corpus: Path, model: str, workers: int) -> dict:
    from data_prep.shards import build_shards

    out = corpus.parent / "shards"
    started = time.perf_counter()
    manifest = build_shards([corpus], model, out, workers=workers, progress=False)
    return {"tokens": manifest["counts"]["tokens"], "seconds": time.perf_counter() - started}


def instances(corpus: Path, model: str, workers: int, objective: str) -> dict:
    from data_prep.instances.build import build_instances

    out = corpus.parent / f"instances_{objective}"
    started = time.perf_counter()
    manifest = build_instances(corpus.parent / "shards", objective, out, workers=workers, progress=False)
    shutil.rmtree(out)  # a kept task would be a resumed run, not a measured one
    counts = manifest["counts"]
    return {
        "tokens": counts["tokens"],
        "instances": counts["instances"],
        "seconds": time.perf_counter() - started,
    }


def _phase(name: str, corpus: Path, model: str, workers: int) -> dict:
    """Run one side in a subprocess; it prints its figures and peak RSS as one JSON line."""
    command = [sys.executable, __file__, "--phase", name, "--corpus", str(corpus), "--model", model]
    output = subprocess.run([*command, "--workers", str(workers)], check=True, capture_output=True, text=True)
    return json.loads(output.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=20.0, help="corpus size: the embedded corpus repeated")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each side; the fastest is kept")
    parser.add_argument(
        "--objectives", nargs="*", default=["mlm", "wwm", "span"], help="`prep instances` objectives timed"
    )
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.phase:
        if args.phase in PHASES:
            result = {"raw": raw, "shards": shards}[args.phase](args.corpus, args.model, args.workers)
        else:
            result = instances(args.corpus, args.model, args.workers, args.phase.removeprefix("instances:"))
        rss = [
            resource.getrusage(who).ru_maxrss / 1024
            for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        ]
        print(json.dumps(result | {"rss_main_mb": rss[0], "rss_worker_mb": rss[1]}))
        return

    with tempfile.TemporaryDirectory(prefix="bench_prep_") as work:
        run(Path(work), args)


def run(work: Path, args: argparse.Namespace) -> None:
    from data_prep.corpus import write_corpus  # not at the top: each side's RSS counts only its own imports
    from data_prep.tokenizer import train_tokenizer

    stats = write_corpus(work / "stdlib.jsonl")
    once = (work / "stdlib.jsonl").read_bytes()
    corpus = work / "corpus.jsonl"
    corpus.write_bytes(once * max(1, round(args.mb * 1e6 / len(once))))
    mb = corpus.stat().st_size / 1e6
    tok = train_tokenizer([work / "stdlib.jsonl"], work / "tokenizer", vocab_size=args.vocab_size)
    print(f"corpus: {stats['documents']} docstrings, {len(once) / 1e6:.2f} MB, repeated to {mb:.1f} MB")
    print(f"tokenizer: unigram {args.vocab_size} trained in {tok['seconds']:.1f}s")

    model = str(work / "tokenizer" / "tokenizer.model")
    names = [*PHASES, *(f"instances:{objective}" for objective in args.objectives)]
    runs = [_phase(name, corpus, model, args.workers) for _ in range(args.repeat) for name in names]
    results = {name: min(runs[i :: len(names)], key=lambda r: r["seconds"]) for i, name in enumerate(names)}
    print(
        f"\n{'workers=' + str(args.workers):<16}{'tokens':>12}{'wall s':>9}{'Mtok/s':>9}{'MB/s':>8}"
        f"{'RSS main MB':>13}{'RSS worker MB':>15}"
    )
    for name, r in results.items():
        print(
            f"{name:<16}{r['tokens']:>12}{r['seconds']:>9.2f}{r['tokens'] / r['seconds'] / 1e6:>9.2f}"
            f"{mb / r['seconds']:>8.2f}{r['rss_main_mb']:>13.0f}{r['rss_worker_mb']:>15.0f}"
        )
    speed = {name: mb / r["seconds"] for name, r in results.items()}
    print(
        f"\nshards / raw: {speed['shards'] / speed['raw']:.2f} (input MB/s; shards encodes sentences, "
        "so its token count differs)"
    )
    for name in names[len(PHASES) :]:
        r = results[name]
        print(
            f"{name} / raw: {speed[name] / speed['raw']:.2f} (same corpus; {r['instances'] / r['seconds']:,.0f} "
            f"instances/s, {r['tokens'] / r['seconds'] / 1e6:.2f} M instance tokens/s)"
        )


if __name__ == "__main__":
    main()
