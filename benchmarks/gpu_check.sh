#!/usr/bin/env bash
# The GPU check of issue 8, one command on a machine with a CUDA GPU (about 4-6 minutes, nothing built but
# the benchmark's shards from the embedded corpus): plmscale against the transformers peer on the shapes of
# GPT-3 XL and BERT-large, bf16, ZeRO-1, one process; prints tokens/s, MFU, peak memory, the ratio and
# plmscale's step in phases.
#
#   bash benchmarks/gpu_check.sh                  # the run
#   bash benchmarks/gpu_check.sh --dry-run        # anywhere: checks arguments and imports, runs nothing
#   bash benchmarks/gpu_check.sh --profile 25     # + the profiler's top kernels of plmscale's step
#
# Extra arguments go to benchmarks/bench_train.py; PYTHON picks the interpreter (default: .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
exec "$PYTHON" benchmarks/bench_train.py --sizes large --ds-config zero1_fp32_grads --warmup 3 --steps 8 --repeat 1 "$@"
