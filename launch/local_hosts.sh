#!/usr/bin/env bash
# Run jclip-train as N JAX processes on this machine, each a "host" with its own virtual CPU devices, joined
# by jax.distributed over localhost (gloo collectives): a multi-host run, or a multi-host bug, on a laptop.
# tests/test_multihost.py starts its processes the same way.
#   launch/local_hosts.sh [--dry-run] N [--config.key=value ...]     e.g. launch/local_hosts.sh 2 --config.total_steps=50
# DEVICES_PER_PROCESS (default 4) devices each, so N processes form one N x 4 mesh; PORT (default: a free
# one) for the coordinator (process 0); JCLIP_HEARTBEAT_TIMEOUT_S bounds the wait for a dead process.
# Process i's output lines start with "[i] "; Ctrl-C (or SIGTERM to this script) stops every process.
set -euo pipefail
. "$(dirname "$0")/common.sh"
if [[ ${1:-} == --dry-run ]]; then DRY_RUN=1; shift; fi
if [[ $# -lt 1 || ! $1 =~ ^[1-9][0-9]*$ ]]; then echo "usage: local_hosts.sh [--dry-run] N [overrides]" >&2; exit 2; fi
N=$1
shift
PORT=${PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
XLA="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-4}"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
for ((i = 0; i < N; i++)); do
  cmd=(env JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT" JAX_NUM_PROCESSES="$N" JAX_PROCESS_ID="$i"
       JAX_PLATFORMS=cpu XLA_FLAGS="$XLA" jclip-train "$@")
  if [[ ${DRY_RUN:-0} == 1 ]]; then run_or_print "${cmd[@]}"; continue; fi
  "${cmd[@]}" > >(sed -u "s/^/[$i] /") 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
