"""An mteb (2.x) encoder for any jclip-jax checkpoint: mteb's own tasks and evaluation code, our model.

    import mteb
    from jclip_jax.evals.mteb_adapter import MtebEncoder

    model = MtebEncoder("path/to/checkpoint")              # a training workdir or a jina-clip HF directory
    results = mteb.evaluate(model, mteb.get_tasks(tasks=["SciFact", "STSBenchmark"]))

It implements mteb's encoder protocol (`encode(inputs: DataLoader[BatchedInput], *, task_metadata,
hf_split, hf_subset, prompt_type=None, **kw)`) for text, images, or both: like mteb's jina-clip wrapper,
a fused text+image input is the sum of the two unit embeddings. Query / document prefixes (e.g. a
jina-clip-v2 task prompt) are put before the texts of that prompt type.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

try:
    import torch  # noqa: F401  (mteb's dependency; checked first so its absence gives this message)
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ModelMeta, ScoringFunction
    from mteb.types import PromptType
except ImportError as e:  # mteb (and torch) come with the eval extra only
    raise ImportError(f"jclip_jax.evals.mteb_adapter needs mteb: pip install -e '.[eval]' ({e})") from e

from jclip_jax.evals.checkpoint_encoder import CheckpointEncoder


class MtebEncoder(AbsEncoder):
    def __init__(self, model_name: str, revision: str | None = None, *, device: str | None = None,
                 batch_size: int = 64, truncate_dim: int | None = None, max_length: int | None = None,
                 query_prefix: str = "", document_prefix: str = "", **kwargs: Any):
        del revision, device, kwargs  # a local checkpoint; JAX places it on its own devices
        self.encoder = CheckpointEncoder(model_name, batch_size=batch_size, truncate_dim=truncate_dim,
                                         max_length=max_length)
        self.model = self.encoder.model
        self.prefixes = {PromptType.query: query_prefix, PromptType.document: document_prefix}
        self.mteb_model_meta = ModelMeta.create_empty(overwrites=dict(
            name=f"jclip-jax/{os.path.basename(os.path.normpath(model_name))}", revision="local",
            embed_dim=self.encoder.embed_dim, similarity_fn_name=ScoringFunction.COSINE,
            modalities=["text", "image"], framework=["JAX"], max_tokens=self.encoder.max_length,
            use_instructions=bool(query_prefix or document_prefix)))

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type: PromptType | None = None,
               **kwargs: Any) -> np.ndarray:
        """Every batch's "text" and/or "image" column -> float32 (N, D); both: their sum."""
        prefix = self.prefixes.get(prompt_type, "")
        texts, images = [], []
        for batch in inputs:
            if "text" in batch:
                texts += [prefix + t for t in batch["text"]]
            if "image" in batch:
                images += list(batch["image"])
        text_emb = self.encoder.texts(texts) if texts else None
        image_emb = self.encoder.images(images) if images else None
        if text_emb is not None and image_emb is not None:
            if len(text_emb) != len(image_emb):
                raise ValueError(f"fused inputs need as many texts ({len(text_emb)}) as images ({len(image_emb)})")
            return text_emb + image_emb
        if text_emb is None and image_emb is None:
            raise ValueError(f"{task_metadata.name}: the inputs have neither a 'text' nor an 'image' column")
        return text_emb if text_emb is not None else image_emb
