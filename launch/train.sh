#!/usr/bin/env bash
# Runs `plmscale train` (or `plmscale distill` with --distill) under the deepspeed launcher.
#
#   launch/train.sh launch/recipes/bert_tiny_demo.yaml [section.key=value ...]          # this machine
#   NUM_PROCS=8 launch/train.sh RECIPE                                                  # 8 local processes
#   HOSTFILE=hosts NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/train.sh RECIPE              # one node of many
#
# On a machine without an NVIDIA GPU it selects DeepSpeed's CPU accelerator (gloo) and one thread per rank.
set -euo pipefail

command=train
args=()
for arg in "$@"; do
  if [[ "$arg" == "--distill" ]]; then command=distill; else args+=("$arg"); fi
done
[[ ${#args[@]} -ge 1 ]] || { echo "usage: launch/train.sh RECIPE.yaml [--distill] [key=value ...]" >&2; exit 2; }
recipe="${args[0]}"
overrides=("${args[@]:1}")

if ! command -v nvidia-smi >/dev/null 2>&1; then
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi

launcher=(deepspeed --no_local_rank --master_port "${MASTER_PORT:-29500}")
if [[ -n "${HOSTFILE:-}" ]]; then
  launcher+=(--hostfile "$HOSTFILE" --no_ssh --node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}")
  world_size=$(awk '!/^[[:space:]]*#/ && match($0, /slots=[0-9]+/) {n += substr($0, RSTART + 6, RLENGTH - 6)} END {print n}' "$HOSTFILE")
else
  launcher+=(--num_gpus "${NUM_PROCS:-2}")
  world_size="${NUM_PROCS:-2}"
fi
# The pre-launch checks, once, before the launcher starts a process per rank: a bad recipe or missing data
# is one line and exit status 2 within seconds, not a traceback from every rank.
plmscale "$command" --config "$recipe" --validate-only --world-size "$world_size" "${overrides[@]}" >/dev/null
exec "${launcher[@]}" --module plmscale.cli "$command" --config "$recipe" "${overrides[@]}"
