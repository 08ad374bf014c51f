#!/usr/bin/env bash
# Run one jclip-train stage on the hosts of a Cloud TPU pod slice (every host the same command).
#   launch/tpu_pod.sh [--dry-run] [--worker=all|0,2,...] TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]
# jclip-train calls jax.distributed.initialize() on multi-host TPUs (jclip_jax/distributed.py) and every host
# reads its own rows of each global batch. The repository must be checked out at ~/jclip-jax on every host
# and installed with the README's set-up commands (pip install -c constraints.txt -e . without the test
# extra). JCLIP_*, JAX_*, XLA_FLAGS and LIBTPU_INIT_ARGS set here are passed to every host. Overrides reach
# jclip-train word for word, spaces and quotes included (e.g. --config.mesh='(("data", -1),)').
# --dry-run prints the command instead of running it.
set -euo pipefail
. "$(dirname "$0")/common.sh"
WORKER=all
while [[ $# -gt 0 && $1 == --* ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --worker=*) WORKER=${1#--worker=} ;;
    *) echo "tpu_pod.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
if [[ $# -lt 4 ]]; then echo "usage: tpu_pod.sh [--dry-run] [--worker=all|0,1] TPU_NAME ZONE CONFIG WORKDIR [overrides]" >&2; exit 2; fi
TPU_NAME=$1 ZONE=$2 CONFIG=$3 WORKDIR=$4
shift 4
mapfile -t ENV_WORDS < <(passed_env)
REMOTE="cd ~/jclip-jax && . .venv/bin/activate && $(quote_words env "${ENV_WORDS[@]}" jclip-train --config "$CONFIG" --workdir "$WORKDIR" "$@")"
run_or_print gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker="$WORKER" --command "$REMOTE"
