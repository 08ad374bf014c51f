"""The metrics of the paper's benchmarks on embeddings: numpy in, floats out.

* image<->text retrieval, CLIP-benchmark protocol: every caption is a query whose one hit is its image;
  every image is a query whose hits are all of its captions (R@k: a hit among the top k).
* zero-shot classification: top-1 / top-5 accuracy and mean per-class recall.
* text retrieval, BEIR/MTEB protocol: nDCG@10 (linear gains, log2 discount, as trec_eval), MRR@10,
  Recall@100; a query with no relevant document (no qrel > 0) has no defined score: it is left out
  of the means and counted.
* STS: Spearman correlation of cosine similarity with the gold score (ties get average ranks).

Ties in a ranking are broken by candidate index (a stable sort of -score), so results are deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def rank_order(scores: np.ndarray) -> np.ndarray:
    """float (Q, C) -> int (Q, C): candidates best first; equal scores keep index order."""
    return np.argsort(-scores, axis=1, kind="stable")


def recall_at_k(similarity: np.ndarray, relevant: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Fraction of queries with at least one relevant candidate among their top k.

    similarity: float (num_queries, num_candidates); relevant: bool of the same shape.
    """
    if similarity.shape != relevant.shape:
        raise ValueError(f"similarity {similarity.shape} and relevant {relevant.shape} differ in shape")
    if not relevant.any(axis=1).all():
        raise ValueError("every query needs at least one relevant candidate")
    hits = np.take_along_axis(relevant, rank_order(similarity), axis=1)  # (Q, C), hits in rank order
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
    Returns image_to_text_r{k}, text_to_image_r{k}, and chance_r1 (the larger of the two directions'
    chance levels).
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


def classification(logits: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """logits float (N, C), labels int (N,) -> top{k} accuracy and mean_per_class_recall.

    Mean per-class recall is the top-1 recall of each class present in `labels`, averaged over those
    classes (sklearn's balanced accuracy). k larger than C counts every sample as a hit.
    """
    labels = np.asarray(labels)
    order = rank_order(logits)
    rank_of_label = (order == labels[:, None]).argmax(axis=1)
    out = {f"top{k}": float((rank_of_label < k).mean()) for k in ks}
    correct = rank_of_label == 0
    out["mean_per_class_recall"] = float(np.mean([correct[labels == c].mean() for c in np.unique(labels)]))
    return out


def top_k(query_emb: np.ndarray, doc_emb: np.ndarray, k: int, chunk: int = 512) -> np.ndarray:
    """The k best documents of each query by dot product, best first: int (Q, min(k, D)).
    Scores are computed `chunk` queries at a time, so a large corpus never needs a (Q, D) matrix."""
    out = [rank_order(query_emb[s:s + chunk] @ doc_emb.T)[:, :k] for s in range(0, len(query_emb), chunk)]
    return np.concatenate(out) if out else np.zeros((0, min(k, len(doc_emb))), np.int64)


def text_retrieval(ranked: np.ndarray, qrels: Sequence[Mapping[int, int]], ndcg_k: int = 10, mrr_k: int = 10,
                   recall_k: int = 100) -> dict[str, float]:
    """BEIR-style ranking metrics.

    ranked: int (Q, K), each query's documents best first (rank_order / top_k, K >= the cut-offs or the
    whole corpus); qrels[q]: {document index: relevance grade}, a grade > 0 is relevant (a relevant
    document missing from the corpus may carry any index absent from `ranked`, e.g. -1: it still
    counts in recall's and the ideal DCG's denominator, as in trec_eval). Returns ndcg@{ndcg_k},
    mrr@{mrr_k}, recall@{recall_k} averaged over the queries with a relevant document, and
    queries_without_relevant (left out of the means).
    """
    if ranked.shape[0] != len(qrels):
        raise ValueError(f"{ranked.shape[0]} queries ranked, {len(qrels)} in qrels")
    ndcg, mrr, recall = [], [], []
    for q, judged in enumerate(qrels):
        grades = {d: g for d, g in judged.items() if g > 0}
        if not grades:
            continue
        gains = np.asarray([grades.get(int(d), 0) for d in ranked[q]], np.float64)
        discount = 1.0 / np.log2(np.arange(2, len(gains) + 2))
        ideal = np.sort(np.asarray(list(grades.values()), np.float64))[::-1][:ndcg_k]
        ideal_discount = 1.0 / np.log2(np.arange(2, len(ideal) + 2))
        ndcg.append((gains[:ndcg_k] * discount[:ndcg_k]).sum() / (ideal * ideal_discount).sum())
        first = np.flatnonzero(gains[:mrr_k] > 0)
        mrr.append(1.0 / (first[0] + 1) if len(first) else 0.0)
        recall.append((gains[:recall_k] > 0).sum() / len(grades))
    if not ndcg:
        raise ValueError("no query has a relevant document (a qrel with score > 0)")
    return {f"ndcg@{ndcg_k}": float(np.mean(ndcg)), f"mrr@{mrr_k}": float(np.mean(mrr)),
            f"recall@{recall_k}": float(np.mean(recall)), "queries_without_relevant": len(qrels) - len(ndcg)}


def sts_spearman(emb1: np.ndarray, emb2: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """Rows of emb1/emb2 (N, D), L2-normalised, and gold scores (N,) -> Spearman of cosine vs gold."""
    from scipy.stats import spearmanr

    cosine = (emb1 * emb2).sum(axis=1)
    return {"spearman": float(spearmanr(cosine, np.asarray(gold, np.float64)).statistic)}
