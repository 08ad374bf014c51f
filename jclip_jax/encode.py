"""The model-card API: `encode_text` / `encode_image` -> L2-normalised numpy arrays in input order.

Shapes are fixed so XLA compiles a handful of programs, not one per call: every batch is padded to
`batch_size` rows, and token ids to one of a few bucket lengths (jclip_jax.tokenizer.DEFAULT_BUCKETS).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jclip_jax.preprocess import eval_transform


@nnx.jit
def _text_features(model, ids):
    return model.text_features(ids)


@nnx.jit
def _image_features(model, pixels):
    return model.image_features(pixels)


def normalize_rows(features: np.ndarray, truncate_dim: int | None = None) -> np.ndarray:
    """Matryoshka truncation first (keep the first k dims), then L2 normalisation, as jina-clip does."""
    if truncate_dim is not None:
        if not 0 < truncate_dim <= features.shape[-1]:
            raise ValueError(f"truncate_dim={truncate_dim} must be in [1, {features.shape[-1]}]")
        features = features[:, :truncate_dim]
    return features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), 1e-12)


def pad_to_batch(x: np.ndarray, rows: int, pad_id: int | None = None) -> np.ndarray:
    """Pad (n, ...) to (rows, ...) so every call has the same shape. Pixels pad with 0; token ids
    (pad_id given) with pad_id, plus one real token per padding row so mean pooling has no 0/0."""
    if x.shape[0] == rows:
        return x
    pad = np.full((rows - x.shape[0], *x.shape[1:]), 0 if pad_id is None else pad_id, x.dtype)
    if pad_id is not None:
        pad[:, 0] = 0 if pad_id != 0 else 1  # any id but the pad id (v1 pads with 0, v2 with 1)
    return np.concatenate([x, pad])


def task_instruction(text_cfg, task: str | None) -> str:
    """The instruction `encode_text(task=...)` prepends (v2's `task_instructions`); '' for task=None."""
    if task is None:
        return ""
    instructions = dict((k, v) for k, v in (text_cfg.get("task_instructions") or ()))
    if task not in instructions:
        raise ValueError(f"encode_text: unknown task {task!r}; this model's task_instructions: {sorted(instructions)}")
    return instructions[task]


def encode_text(model, texts: Sequence[str], batch_size: int = 32, truncate_dim: int | None = None,
                max_length: int | None = None, task: str | None = None) -> np.ndarray:
    """texts -> float32 (len(texts), embed_dim), unit norm. Truncates to `max_length` tokens (default 512).

    task (v2, e.g. "retrieval.query"): that task's instruction is prepended to every text, as jina-clip does.
    """
    if model.tokenizer is None:
        raise ValueError("this model has no tokenizer: load it with from_pretrained from a directory holding "
                         "tokenizer.json, or set model.tokenizer = jclip_jax.tokenizer.TextTokenizer(path)")
    if isinstance(texts, str):
        texts = [texts]
    instruction = task_instruction(model.cfg.text, task)
    if instruction:
        texts = [instruction + t for t in texts]
    max_length = max_length or model.cfg.text.max_length
    out = []
    for start in range(0, len(texts), batch_size):
        ids = model.tokenizer(texts[start:start + batch_size], max_length=max_length)
        n = ids.shape[0]
        ids = pad_to_batch(ids, batch_size, model.tokenizer.pad_id)
        out.append(np.asarray(_text_features(model, jnp.asarray(ids)))[:n])
    features = np.concatenate(out) if out else np.zeros((0, model.embed_dim), np.float32)
    return normalize_rows(features, truncate_dim)


def encode_image(model, images: Sequence, batch_size: int = 32, truncate_dim: int | None = None) -> np.ndarray:
    """PIL images or paths -> float32 (len(images), embed_dim), unit norm (spec §1.4 preprocessing)."""
    if not isinstance(images, (list, tuple)):
        images = [images]
    size = model.cfg.vision.image_size
    out = []
    for start in range(0, len(images), batch_size):
        pixels = np.stack([eval_transform(im, size) for im in images[start:start + batch_size]])
        n = pixels.shape[0]
        pixels = pad_to_batch(pixels, batch_size)
        out.append(np.asarray(_image_features(model, jnp.asarray(pixels)))[:n])
    features = np.concatenate(out) if out else np.zeros((0, model.embed_dim), np.float32)
    return normalize_rows(features, truncate_dim)
