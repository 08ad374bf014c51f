#!/usr/bin/env bash
# Run one jclip-train stage on several GPU hosts under SLURM (one process per host, all its GPUs).
#   sbatch --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 launch/gpu_hosts.sh CONFIG WORKDIR [--config.key=value ...]
# jax.distributed.initialize() picks up SLURM's environment; on a single host just run jclip-train.
set -euo pipefail
CONFIG=$1 WORKDIR=$2
shift 2
srun bash -c ". .venv/bin/activate && jclip-train --config $CONFIG --workdir $WORKDIR $*"
