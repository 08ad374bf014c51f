"""Embeddings for evaluation: fixed-shape batches split over the devices of a mesh, as training does.

Every batch has `batch_size` rows (the last one padded), so XLA compiles one program per input shape
(one for pixels, one per token bucket length) however large the set is. Each batch is sharded over the
mesh's batch axes; the features come back replicated, so every process of a multi-host run gets all
of them. Images are decoded and preprocessed in a thread pool (PIL releases the GIL).

    embedder = Embedder(graphdef, mesh, batch_size=256)
    feats = embedder.texts(params, tokenizer, ["a cat", ...])       # float32 (N, D), not normalised
    feats = embedder.images(params, ["a.jpg", pil_image, ...], 224)  # (features, indices that decoded)
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image
from tqdm.auto import tqdm

from jclip_jax import distributed, sharding
from jclip_jax.inference import pad_to_batch
from jclip_jax.preprocess import eval_transform
from jclip_jax.tokenizer import DEFAULT_BUCKETS


def default_mesh() -> jax.sharding.Mesh:
    """All devices on one 'data' axis."""
    return sharding.make_mesh((("data", -1),))


def image_pixels(image, size: int) -> np.ndarray | str:
    """A path, encoded bytes or PIL image -> float32 (size, size, 3), or the reason it cannot be read."""
    try:
        return eval_transform(Image.open(io.BytesIO(image)) if isinstance(image, bytes) else image, size)
    except Exception as e:  # any decoder error costs this image only; the caller counts it
        where = os.fspath(image) if isinstance(image, (str, os.PathLike)) else type(image).__name__
        return f"{where}: {type(e).__name__}: {e}"


class Embedder:
    """Text and image features of a model (graphdef + params) in fixed-shape sharded batches."""

    def __init__(self, graphdef, mesh: jax.sharding.Mesh | None = None, batch_size: int = 64,
                 batch_axes: Sequence[str] | None = None, progress: bool = False, threads: int = 8):
        self.mesh = mesh or default_mesh()
        axes = tuple(batch_axes) if batch_axes is not None else sharding.batch_axes(self.mesh)
        shards = math.prod(self.mesh.shape[a] for a in axes)
        self.batch_size = -(-batch_size // shards) * shards  # a multiple of the batch shards
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(axes))
        self.progress, self.threads = progress, threads
        replicated = NamedSharding(self.mesh, PartitionSpec())
        # several processes: each program compiled everywhere before it runs (distributed.CompiledTogether)
        self._text = distributed.CompiledTogether(
            jax.jit(lambda params, ids: nnx.merge(graphdef, params).text_features(ids), out_shardings=replicated),
            "eval_text_features")
        self._image = distributed.CompiledTogether(
            jax.jit(lambda params, pixels: nnx.merge(graphdef, params).image_features(pixels),
                    out_shardings=replicated), "eval_image_features")
        self.decode_failures: list[str] = []  # reasons, appended by images()

    def replicate(self, state):
        """Put a model state (host or device arrays) on every device of the mesh."""
        return jax.device_put(state, NamedSharding(self.mesh, PartitionSpec()))

    def _global(self, batch: np.ndarray) -> jax.Array:
        # every process holds the whole batch: each device takes its slice (works on one or many hosts)
        return jax.make_array_from_callback(batch.shape, self.batch_sharding, lambda index: batch[index])

    def _run(self, fn: Callable, params, batch: np.ndarray, pad_id: int | None = None) -> np.ndarray:
        n = batch.shape[0]
        out = fn(params, self._global(pad_to_batch(batch, self.batch_size, pad_id)))
        return np.asarray(out.addressable_data(0), np.float32)[:n]  # replicated: any local copy is all of it

    def _chunks(self, n: int, desc: str):
        starts = range(0, n, self.batch_size)
        return tqdm(starts, desc=desc, unit="batch", disable=not self.progress, leave=False)

    def token_ids(self, params, ids: np.ndarray, pad_id: int, desc: str = "text") -> np.ndarray:
        """int32 (N, L) right-padded ids -> float32 (N, D) features (not normalised)."""
        out = [self._run(self._text, params, ids[s:s + self.batch_size], pad_id) for s in self._chunks(len(ids), desc)]
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def texts(self, params, tokenizer, texts: Sequence[str], max_length: int, desc: str = "text") -> np.ndarray:
        """Strings -> float32 (N, D) features in input order; each batch padded to a token bucket (few
        compiles). Texts are batched shortest first, so a corpus of mixed lengths pads little."""
        order = np.argsort([len(t) for t in texts], kind="stable")
        out = []
        for s in self._chunks(len(texts), desc):
            ids = tokenizer([texts[i] for i in order[s:s + self.batch_size]], max_length, buckets=DEFAULT_BUCKETS)
            out.append(self._run(self._text, params, ids, tokenizer.pad_id))
        if not out:
            return np.zeros((0, 0), np.float32)
        stacked = np.concatenate(out)
        feats = np.empty_like(stacked)
        feats[order] = stacked
        return feats

    def pixels(self, params, pixels: np.ndarray, desc: str = "images") -> np.ndarray:
        """float32 (N, S, S, 3) CLIP-normalised -> float32 (N, D) features."""
        out = [self._run(self._image, params, pixels[s:s + self.batch_size]) for s in self._chunks(len(pixels), desc)]
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def images(self, params, images: Sequence, size: int, desc: str = "images") -> tuple[np.ndarray, np.ndarray]:
        """Paths / bytes / PIL images -> (float32 (M, D) features, int (M,) indices of the images that
        decoded). Each failure is appended to `self.decode_failures` and costs that image only."""
        feats, kept = [], []
        with ThreadPoolExecutor(self.threads) as pool:
            for s in self._chunks(len(images), desc):
                decoded = list(pool.map(lambda im: image_pixels(im, size), images[s:s + self.batch_size]))
                good = [i for i, p in enumerate(decoded) if not isinstance(p, str)]
                self.decode_failures += [p for p in decoded if isinstance(p, str)]
                if good:
                    feats.append(self._run(self._image, params, np.stack([decoded[i] for i in good])))
                    kept += [s + i for i in good]
        if not feats:
            raise ValueError(f"none of the {len(images)} images could be read; first error: "
                             f"{self.decode_failures[0] if self.decode_failures else 'no images'}")
        return np.concatenate(feats), np.asarray(kept, np.int64)
