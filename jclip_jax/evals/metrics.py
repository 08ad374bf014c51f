"""Retrieval evaluation the way the paper reports it: Recall@k in both directions (image<->text) and
for text pairs, with the chance level of each set so a number can be read against it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def recall_at_k(similarity: np.ndarray, relevant: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Fraction of queries with at least one relevant candidate among their top k.

    similarity: float (num_queries, num_candidates); relevant: bool of the same shape.
    Ties are broken by candidate index (a stable arg-sort of -similarity), so results are deterministic.
    """
    if similarity.shape != relevant.shape:
        raise ValueError(f"similarity {similarity.shape} and relevant {relevant.shape} differ in shape")
    if not relevant.any(axis=1).all():
        raise ValueError("every query needs at least one relevant candidate")
    order = np.argsort(-similarity, axis=1, kind="stable")
    hits = np.take_along_axis(relevant, order, axis=1)  # (Q, C), hits in rank order
    first_hit = hits.argmax(axis=1)  # rank of the best-ranked relevant candidate
    return {k: float((first_hit < k).mean()) for k in ks}


def chance_recall_at_1(relevant: np.ndarray) -> float:
    """Expected R@1 of a random ranking: mean over queries of (#relevant / #candidates)."""
    return float((relevant.sum(axis=1) / relevant.shape[1]).mean())


def image_text_retrieval(image_emb: np.ndarray, text_emb: np.ndarray, text_to_image: np.ndarray,
                         ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Zero-shot retrieval in both directions.

    image_emb: (I, D), text_emb: (T, D), both L2-normalised; text_to_image: int (T,), the image of each
    caption (an image may have several captions, as in COCO / Flickr30k).
    Returns image_to_text_r{k}, text_to_image_r{k}, and chance_r1 (image->text chance level; the
    text->image chance level is 1 / I).
    """
    text_to_image = np.asarray(text_to_image)
    sim = image_emb @ text_emb.T  # (I, T)
    relevant = text_to_image[None, :] == np.arange(image_emb.shape[0])[:, None]
    i2t = recall_at_k(sim, relevant, ks)
    t2i = recall_at_k(sim.T, relevant.T, ks)
    out = {f"image_to_text_r{k}": v for k, v in i2t.items()}
    out.update({f"text_to_image_r{k}": v for k, v in t2i.items()})
    out["chance_r1"] = max(chance_recall_at_1(relevant), chance_recall_at_1(relevant.T))
    return out


def text_pair_retrieval(query_emb: np.ndarray, passage_emb: np.ndarray, ks: Sequence[int] = (1, 5, 10)
                        ) -> dict[str, float]:
    """Query i's positive is passage i. Returns text_to_text_r{k} and text_chance_r1."""
    relevant = np.eye(query_emb.shape[0], passage_emb.shape[0], dtype=bool)
    out = {f"text_to_text_r{k}": v for k, v in recall_at_k(query_emb @ passage_emb.T, relevant, ks).items()}
    out["text_chance_r1"] = chance_recall_at_1(relevant)
    return out
