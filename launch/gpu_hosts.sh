#!/usr/bin/env bash
# Run one jclip-train stage on several GPU hosts, one process per host using all its GPUs.
#   sbatch --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 launch/gpu_hosts.sh CONFIG WORKDIR [--config.key=value ...]
#   HOSTS=h0,h1 launch/gpu_hosts.sh CONFIG WORKDIR [...]      # no SLURM: ssh to each host, h0 coordinates
#   launch/gpu_hosts.sh --dry-run CONFIG WORKDIR [...]        # print the command(s) instead of running them
# Under SLURM, jax.distributed.initialize() reads SLURM's environment (srun passes ours on). With HOSTS,
# host i runs with JAX_COORDINATOR_ADDRESS=h0:$PORT (default 8476), JAX_NUM_PROCESSES, JAX_PROCESS_ID=i and
# the JCLIP_*, JAX_*, XLA_FLAGS, NCCL_* variables set here; the repository is at $REPO_DIR (default
# ~/jclip-jax) on every host. Overrides reach jclip-train word for word, spaces and quotes included.
set -euo pipefail
. "$(dirname "$0")/common.sh"
if [[ ${1:-} == --dry-run ]]; then DRY_RUN=1; shift; fi
if [[ $# -lt 2 ]]; then echo "usage: gpu_hosts.sh [--dry-run] CONFIG WORKDIR [overrides]" >&2; exit 2; fi
CONFIG=$1 WORKDIR=$2
shift 2
if [[ -z ${HOSTS:-} ]]; then
  # "$@" after the script: bash receives the words as arguments, never re-split
  run_or_print srun bash -c '. .venv/bin/activate && exec jclip-train "$@"' jclip-train \
    --config "$CONFIG" --workdir "$WORKDIR" "$@"
  exit
fi
IFS=, read -r -a HOST_LIST <<< "$HOSTS"
mapfile -t ENV_WORDS < <(passed_env)
COORDINATOR="${HOST_LIST[0]}:${PORT:-8476}"
pids=()
for i in "${!HOST_LIST[@]}"; do
  REMOTE="cd ${REPO_DIR:-~/jclip-jax} && . .venv/bin/activate && $(quote_words env "${ENV_WORDS[@]}" \
    JAX_COORDINATOR_ADDRESS="$COORDINATOR" JAX_NUM_PROCESSES="${#HOST_LIST[@]}" JAX_PROCESS_ID="$i" \
    jclip-train --config "$CONFIG" --workdir "$WORKDIR" "$@")"
  if [[ ${DRY_RUN:-0} == 1 ]]; then run_or_print ssh "${HOST_LIST[$i]}" "$REMOTE"; continue; fi
  ssh "${HOST_LIST[$i]}" "$REMOTE" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
