"""A checkpoint ready to embed for the harness adapters: texts / images -> L2-normalised numpy rows.

    enc = CheckpointEncoder("workdirs/demo")                      # a training workdir or a jina-clip HF dir
    enc.texts(["a cat"]), enc.images([pil_image]), enc.pixels(float32 (N, S, S, 3)), enc.token_ids(ids)

Embeddings run through evals.embed.Embedder (fixed-shape batches sharded over all devices), with the
model's params replicated once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flax import nnx

from jclip_jax.evals.embedder import Embedder
from jclip_jax.inference import normalize_rows
from jclip_jax.loading import load_model


class CheckpointEncoder:
    def __init__(self, checkpoint: str, batch_size: int = 64, truncate_dim: int | None = None,
                 max_length: int | None = None, tokenizer: str | None = None, step: int | None = None,
                 progress: bool = False):
        self.model = load_model(checkpoint, step=step, tokenizer=tokenizer)
        if truncate_dim is not None and not 0 < truncate_dim <= self.model.embed_dim:
            raise ValueError(f"truncate_dim={truncate_dim} must be in [1, {self.model.embed_dim}]")
        self.checkpoint, self.truncate_dim = checkpoint, truncate_dim
        self.tokenizer = self.model.tokenizer
        self.image_size = self.model.cfg.vision.image_size
        self.max_length = max_length or self.model.cfg.text.max_length
        graphdef, state = nnx.split(self.model)
        self.embedder = Embedder(graphdef, batch_size=batch_size, progress=progress)
        self.state = self.embedder.replicate(state)

    @property
    def embed_dim(self) -> int:
        return self.truncate_dim or self.model.embed_dim

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        """float32 (N, embed_dim), unit rows."""
        return normalize_rows(self.embedder.texts(self.state, self.tokenizer, list(texts), self.max_length),
                              self.truncate_dim)

    def token_ids(self, ids: np.ndarray) -> np.ndarray:
        """int32 (N, L) ids right-padded with the tokenizer's pad id -> float32 (N, embed_dim), unit rows."""
        return normalize_rows(self.embedder.token_ids(self.state, np.asarray(ids, np.int32), self.tokenizer.pad_id),
                              self.truncate_dim)

    def images(self, images: Sequence) -> np.ndarray:
        """PIL images, paths or encoded bytes -> float32 (N, embed_dim), unit rows; an unreadable image
        fails naming it (a harness needs one row per input)."""
        self.embedder.decode_failures = []
        feats, kept = self.embedder.images(self.state, list(images), self.image_size)
        if len(kept) != len(images):
            first = self.embedder.decode_failures[0]
            raise ValueError(f"{len(images) - len(kept)} image(s) could not be read: {first}")
        return normalize_rows(feats, self.truncate_dim)

    def pixels(self, pixels: np.ndarray) -> np.ndarray:
        """float32 (N, S, S, 3) CLIP-normalised pixels -> float32 (N, embed_dim), unit rows."""
        return normalize_rows(self.embedder.pixels(self.state, np.asarray(pixels, np.float32)), self.truncate_dim)
