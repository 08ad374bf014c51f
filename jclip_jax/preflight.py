"""Checks of a training config against its data and mesh, before the model is built or data is read.

Each raises ValueError in one line naming the config key and value (jclip-train prints it and exits 2).
train_config.validate checks the config on its own; these need the prepared directories' manifests or the
device mesh.
"""

from __future__ import annotations

import math

from jclip_jax import losses, sharding
from jclip_jax.data import records

# The record kind a task needs from config.data.text_dir (losses' task names -> records.KINDS).
TEXT_KIND = {"text_pair": "text_pair", "text_triplet": "triplet"}


def _local_dir(path) -> bool:
    return bool(path) and "://" not in path and not path.startswith("tfds:")


def check_data_dirs(config) -> None:
    """Every prepared directory the config names holds the record kind its use needs, and records."""
    tasks = losses.check_loss_config(config.loss)
    wanted = {"data.image_text_dir": "image_text", "evals.image_text_dir": "image_text",
              "evals.text_pairs_dir": "text_pair"}
    text_kinds = {TEXT_KIND[t] for t in tasks if t in TEXT_KIND}
    if len(text_kinds) > 1:
        raise ValueError(f"config.loss tasks {tasks} need both text pairs and triplets from one config.data.text_dir")
    if text_kinds:
        wanted["data.text_dir"] = text_kinds.pop()
    for key, kind in wanted.items():
        section, name = key.split(".")
        path = config[section][name]
        if not _local_dir(path):
            continue
        try:
            manifest = records.read_manifest(path)
        except FileNotFoundError:
            raise ValueError(f"config.{key}={path!r} is not a prepared dataset (no {records.MANIFEST}; "
                             "run jclip-prepare)") from None
        if manifest.get("kind") != kind:
            stage = f" (config.loss.stage={config.loss.stage})" if key == "data.text_dir" else ""
            raise ValueError(f"config.{key}={path!r} holds {manifest.get('kind')!r} records; this run needs "
                             f"{kind!r} records there{stage}")
        empty = [name for name, entry in manifest["datasets"].items()
                 if not entry.get("count") or not entry.get("files")]
        if not manifest["datasets"] or empty:
            raise ValueError(f"config.{key}={path!r} holds no records" +
                             (f" in dataset(s) {sorted(empty)}" if empty else ""))


def check_batch_split(config, mesh) -> None:
    """The batch sizes divide over the devices the batch is split over, times micro_batches."""
    axes = sharding.batch_axes(mesh)
    devices = math.prod(mesh.shape[a] for a in axes)
    split = devices * config.micro_batches
    sizes = {"data.image_batch_size": config.data.image_batch_size}
    if config.data.text_dir:
        sizes["data.text_batch_size"] = config.data.text_batch_size
    for key, size in sizes.items():
        if size % split:
            over = " x ".join(f"{a}={mesh.shape[a]}" for a in axes) or "1"
            raise ValueError(f"config.{key}={size} is not divisible by {split}: the batch is split over the mesh "
                             f"axes {over} and config.micro_batches={config.micro_batches}")
