"""The model-card API: `encode_text` / `encode_image` -> L2-normalised numpy arrays in input order.

Shapes are fixed so XLA compiles a handful of programs, not one per call: every batch is padded to
`batch_size` rows, and token ids to one of a few bucket lengths (jclip_jax.tokenizer.DEFAULT_BUCKETS).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jclip_jax.models.layers import l2_normalize
from jclip_jax.preprocess import eval_transform


@nnx.jit
def _text_features(model, ids):
    return model.text_features(ids)


@nnx.jit
def _image_features(model, pixels):
    return model.image_features(pixels)


def normalize_rows(features: np.ndarray, truncate_dim: int | None = None) -> np.ndarray:
    """float32 (N, D) -> float32 (N, k) unit rows: Matryoshka truncation first (keep the first k =
    truncate_dim dims), then L2 normalisation (layers.l2_normalize), as jina-clip does."""
    if truncate_dim is not None:
        if not 0 < truncate_dim <= features.shape[-1]:
            raise ValueError(f"truncate_dim={truncate_dim} must be in [1, {features.shape[-1]}]")
        features = features[:, :truncate_dim]
    return np.asarray(l2_normalize(jnp.asarray(features, jnp.float32)))


def pad_to_batch(x: np.ndarray, rows: int, pad_id: int | None = None) -> np.ndarray:
    """Pad (n, ...) to (rows, ...) so every call has the same shape. Pixels pad with 0; token ids
    (pad_id given) with pad_id, plus one real token per padding row so mean pooling has no 0/0."""
    if x.shape[0] == rows:
        return x
    pad = np.full((rows - x.shape[0], *x.shape[1:]), 0 if pad_id is None else pad_id, x.dtype)
    if pad_id is not None:
        pad[:, 0] = 0 if pad_id != 0 else 1  # any id but the pad id (v1 pads with 0, v2 with 1)
    return np.concatenate([x, pad])


def _positive_int(name: str, value, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer" + (" or None" if optional else ""))


def check_texts(texts) -> list[str]:
    """A string or a sequence of strings -> list; anything else is a ValueError naming the item."""
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, Sequence):
        raise ValueError(f"texts must be a string or a list of strings, got {type(texts).__name__}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"texts[{i}] is a {type(text).__name__}, not a string")
    return list(texts)


IMAGE_TYPES = "PIL.Image.Image or a file path (str / os.PathLike)"


def check_images(images) -> list:
    """One image or a sequence of them -> list. Accepted, as in jina-clip's encode_image: PIL images and file
    paths (no URLs: nothing is downloaded). Arrays and raw bytes are refused, naming the accepted types."""
    import os

    from PIL import Image

    if isinstance(images, (Image.Image, str, os.PathLike)):
        images = [images]
    if not isinstance(images, (list, tuple)):
        raise ValueError(f"images must be a list of {IMAGE_TYPES}, got {type(images).__name__}")
    for i, image in enumerate(images):
        if isinstance(image, Image.Image):
            continue
        if isinstance(image, (str, os.PathLike)):
            if str(image).startswith(("http://", "https://")):
                raise ValueError(f"images[{i}] is a URL; download it first (nothing is fetched here)")
            continue
        hint = ("; for an array use PIL.Image.fromarray(a), for encoded bytes PIL.Image.open(io.BytesIO(b))"
                if isinstance(image, (np.ndarray, bytes, bytearray, memoryview)) else "")
        raise ValueError(f"images[{i}] is a {type(image).__name__}; expected {IMAGE_TYPES}{hint}")
    return list(images)


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
    texts = check_texts(texts)
    _positive_int("batch_size", batch_size)
    _positive_int("truncate_dim", truncate_dim, optional=True)
    _positive_int("max_length", max_length, optional=True)
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
    images = check_images(images)
    _positive_int("batch_size", batch_size)
    _positive_int("truncate_dim", truncate_dim, optional=True)
    size = model.cfg.vision.image_size
    out = []
    for start in range(0, len(images), batch_size):
        pixels = np.stack([eval_transform(im, size) for im in images[start:start + batch_size]])
        n = pixels.shape[0]
        pixels = pad_to_batch(pixels, batch_size)
        out.append(np.asarray(_image_features(model, jnp.asarray(pixels)))[:n])
    features = np.concatenate(out) if out else np.zeros((0, model.embed_dim), np.float32)
    return normalize_rows(features, truncate_dim)
