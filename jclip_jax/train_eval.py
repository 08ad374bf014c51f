"""Evaluation during training: zero-shot image<->text retrieval and text-pair retrieval on held-out sets
(config.evals), as Recall@1/5/10 with the chance level of each set."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jclip_jax import distributed, encode, evaluate
from jclip_jax.data import pipeline, records
from jclip_jax.tokenizer import TextTokenizer


def _read_text_pairs(directory: str) -> tuple[list[str], list[str]]:
    import grain

    manifest = records.read_manifest(directory, kind="text_pair")
    paths = [p for entry in manifest["datasets"].values() for p in entry["paths"]]
    rows = [records.decode(r) for r in grain.sources.ArrayRecordDataSource(paths)]
    return [r["query"] for r in rows], [r["positive"] for r in rows]


class RetrievalEvaluator:
    """Loads the held-out sets once; `evaluator(params)` -> {metric: value} (empty without eval sets)."""

    def __init__(self, config, graphdef):
        self.graphdef, self.batch_size = graphdef, config.evals.batch_size
        self.image_text = self.text_pairs = None
        max_length = config.data.image_max_length
        if config.evals.image_text_dir:
            self.image_text = pipeline.retrieval_eval_set(
                config.evals.image_text_dir, config.data.tokenizer_path, config.model.vision.image_size, max_length)
        if config.evals.text_pairs_dir:
            tok = TextTokenizer(config.data.tokenizer_path)
            queries, positives = _read_text_pairs(config.evals.text_pairs_dir)
            self.text_pairs = (tok(queries, config.data.text_max_length, buckets=None),
                               tok(positives, config.data.text_max_length, buckets=None))
        self.pad_id = config.model.text.pad_token_id

        @jax.jit
        def text_features(params, ids):
            return nnx.merge(graphdef, params).text_features(ids)

        @jax.jit
        def image_features(params, pixels):
            return nnx.merge(graphdef, params).image_features(pixels)

        # several processes: each program compiled everywhere before it runs (distributed.CompiledTogether)
        self._text = distributed.CompiledTogether(text_features, "eval_text_features")
        self._image = distributed.CompiledTogether(image_features, "eval_image_features")

    def _embed(self, fn, params, x: np.ndarray, pad_id: int | None = None) -> np.ndarray:
        """Fixed-size batches (one compile), padded rows dropped; L2-normalised float32 (N, D)."""
        out = []
        for start in range(0, len(x), self.batch_size):
            chunk = x[start:start + self.batch_size]
            padded = encode.pad_to_batch(chunk, self.batch_size, pad_id)
            out.append(np.asarray(fn(params, jnp.asarray(padded)))[:len(chunk)])
        return encode.normalize_rows(np.concatenate(out))

    def __call__(self, params) -> dict[str, float]:
        results = {}
        if self.image_text is not None:
            s = self.image_text
            images = self._embed(self._image, params, s["images"])
            texts = self._embed(self._text, params, s["text"], self.pad_id)
            results.update(evaluate.image_text_retrieval(images, texts, s["text_image"]))
            results["eval_decode_failures"] = int(s["decode_failures"])
        if self.text_pairs is not None:
            q = self._embed(self._text, params, self.text_pairs[0], self.pad_id)
            p = self._embed(self._text, params, self.text_pairs[1], self.pad_id)
            results.update(evaluate.text_pair_retrieval(q, p))
        return results
