#!/usr/bin/env bash
# Run one jclip-train stage on every host of a Cloud TPU pod slice.
#   launch/tpu_pod.sh TPU_NAME ZONE configs/jina_clip_v1/stage1.py gs://bucket/stage1 [--config.key=value ...]
# Each host runs the same command; jclip-train calls jax.distributed.initialize() on multi-host TPUs and
# every host reads its own share of the data. The repository must be checked out at ~/jclip-jax on
# every host (e.g. with `gcloud compute tpus tpu-vm scp` or a shared image) and installed with the
# README's two set-up commands (pip install -c constraints.txt -e . without the test extra).
set -euo pipefail
TPU_NAME=$1 ZONE=$2 CONFIG=$3 WORKDIR=$4
shift 4
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  "cd ~/jclip-jax && . .venv/bin/activate && jclip-train --config $CONFIG --workdir $WORKDIR $*"
