#!/usr/bin/env bash
# Runs `plmscale train` (or `plmscale distill` with --distill) under the deepspeed launcher.
#
#   launch/train.sh launch/recipes/bert_tiny_demo.yaml [section.key=value ...]          # this machine
#   NUM_PROCS=8 launch/train.sh RECIPE                                                  # 8 local processes
#   HOSTFILE=hosts launch/train.sh RECIPE                                               # every node, from one
#   HOSTFILE=hosts NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/train.sh RECIPE              # one node of many
#
# The hostfile has one `HOST slots=N` line per node. Without NODE_RANK, DeepSpeed's runner starts every node
# from this one with pdsh over ssh. INCLUDE / EXCLUDE pick hosts or slots (`worker-0@worker-1:0,2`),
# SSH_PORT the ssh port, MASTER_ADDR the rendezvous host (default: the first host's address). Every node
# runs from this directory with this Python, so both must be at the same path everywhere (a shared
# filesystem); it gets the variables DeepSpeed forwards (NCCL_*, PYTHON*, ...) plus the KEY=VALUE lines of
# .deepspeed_env here or in $HOME (DS_ENV_FILE names another file), not this shell's environment.
# With NODE_RANK, this node alone starts (no ssh): run it on every node with its rank, e.g. under srun.
#
# On a machine without an NVIDIA GPU it selects DeepSpeed's CPU accelerator (gloo) and one thread per rank
# (nodes started over ssh: set OMP_NUM_THREADS in .deepspeed_env; DeepSpeed falls back to its CPU accelerator).
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
if [[ -z "${HOSTFILE:-}" ]]; then
  launcher+=(--num_gpus "${NUM_PROCS:-2}")
  world_size="${NUM_PROCS:-2}"
else
  launcher+=(--hostfile "$HOSTFILE")
  # every slot of the hostfile; with INCLUDE / EXCLUDE only the launcher knows, and the ranks check alone
  world_size=$(awk '!/^[[:space:]]*#/ && match($0, /slots=[0-9]+/) {n += substr($0, RSTART + 6, RLENGTH - 6)} END {print n}' "$HOSTFILE")
  if [[ -n "${INCLUDE:-}${EXCLUDE:-}" ]]; then world_size=""; fi
  if [[ -n "${INCLUDE:-}" ]]; then launcher+=(--include "$INCLUDE"); fi
  if [[ -n "${EXCLUDE:-}" ]]; then launcher+=(--exclude "$EXCLUDE"); fi
  if [[ -n "${NODE_RANK:-}" ]]; then
    launcher+=(--no_ssh --node_rank "$NODE_RANK" --master_addr "${MASTER_ADDR:-127.0.0.1}")
  else
    launcher+=(--launcher pdsh)
    if [[ -n "${SSH_PORT:-}" ]]; then launcher+=(--ssh_port "$SSH_PORT"); fi
    if [[ -n "${MASTER_ADDR:-}" ]]; then launcher+=(--master_addr "$MASTER_ADDR"); fi
  fi
fi
# The pre-launch checks, once, before the launcher starts a process per rank: a bad recipe or missing data
# is one line and exit status 2 within seconds, not a traceback from every rank.
if [[ -n "$world_size" ]]; then
  plmscale "$command" --config "$recipe" --validate-only --world-size "$world_size" "${overrides[@]}" >/dev/null
fi
exec "${launcher[@]}" --module plmscale.cli "$command" --config "$recipe" "${overrides[@]}"
