"""Metrics on hand-built embeddings whose answers are worked out by hand in the comments: the
CLIP-benchmark retrieval protocol (several captions per image), ties, a query with no relevant document."""

import numpy as np
import pytest

from jclip_jax.evals.metrics import (
    chance_recall_at_1,
    classification,
    image_text_retrieval,
    rank_order,
    recall_at_k,
    sts_spearman,
    text_pair_retrieval,
    text_retrieval,
    top_k,
)


def test_recall_at_k_by_hand():
    sim = np.array([[0.9, 0.1, 0.5],   # relevant = 0 -> rank 0
                    [0.9, 0.1, 0.5],   # relevant = 2 -> rank 1
                    [0.9, 0.8, 0.5]])  # relevant = 2 -> rank 2
    relevant = np.eye(3, dtype=bool)[[0, 2, 2]]
    assert recall_at_k(sim, relevant, ks=(1, 2, 3)) == {1: 1 / 3, 2: 2 / 3, 3: 1.0}
    with pytest.raises(ValueError, match="at least one relevant"):
        recall_at_k(sim, np.zeros((3, 3), bool))


def test_five_captions_per_image_and_ties():
    """2 images, 5 captions each. With image_emb = I, caption t's similarity to image i is text[t, i]."""
    image = np.eye(2)
    text = np.array([
        [0.9, 0.1],   # c0 (image 0): -> image 0  hit
        [0.2, 0.8],   # c1 (image 0): -> image 1  miss
        [0.5, 0.5],   # c2 (image 0): tie -> the lower index, image 0: hit
        [0.3, 0.4],   # c3 (image 0): miss
        [0.6, 0.0],   # c4 (image 0): hit
        [0.1, 0.7],   # c5 (image 1): hit
        [0.4, 0.4],   # c6 (image 1): tie -> image 0: miss
        [0.0, 0.95],  # c7 (image 1): hit
        [0.95, 0.3],  # c8 (image 1): miss
        [0.2, 0.3],   # c9 (image 1): hit
    ])
    owner = np.repeat([0, 1], 5)
    out = image_text_retrieval(image, text, owner, ks=(1, 2))
    assert out["text_to_image_r1"] == 0.6  # c0 c2 c4 c5 c7 c9
    assert out["text_to_image_r2"] == 1.0
    # image 0's best caption is c8 (0.95, image 1's): miss at 1; c0 (0.9) second: hit at 2.
    # image 1's best caption is c7 (0.95), one of its five: a hit, though it is not its first caption.
    assert out["image_to_text_r1"] == 0.5 and out["image_to_text_r2"] == 1.0
    assert out["chance_r1"] == 0.5  # image->text: 5 of 10 captions relevant; text->image: 1 of 2
    # a protocol that took only each image's first caption as relevant would score image 1 a miss
    first_only = np.zeros((2, 10), bool)
    first_only[0, 0] = first_only[1, 5] = True
    assert recall_at_k(image @ text.T, first_only, ks=(1,))[1] == 0.0


def test_rank_order_breaks_ties_by_index():
    np.testing.assert_array_equal(rank_order(np.array([[0.5, 0.7, 0.5, 0.7]])), [[1, 3, 0, 2]])


def test_classification_by_hand():
    logits = np.array([[0.9, 0.1, 0.0],   # label 0: rank 0
                       [0.5, 0.5, 0.0],   # label 1: tie with class 0, which ranks first: rank 1
                       [0.2, 0.3, 0.1],   # label 2: rank 2
                       [0.1, 0.7, 0.2],   # label 1: rank 0
                       [0.3, 0.2, 0.4]])  # label 0: rank 1
    labels = np.array([0, 1, 2, 1, 0])
    out = classification(logits, labels, ks=(1, 2, 5))
    assert out["top1"] == 0.4 and out["top2"] == 0.8 and out["top5"] == 1.0
    # per class: class 0 1/2, class 1 1/2, class 2 0/1
    assert out["mean_per_class_recall"] == pytest.approx(1 / 3)


def test_text_retrieval_by_hand():
    scores = np.array([
        [0.1, 0.9, 0.5, 0.5, 0.0],  # q0: order d1 d2 d3 d0 d4 (d2, d3 tie: index order)
        [0.8, 0.1, 0.2, 0.3, 0.4],  # q1: order d0 d4 d3 d2 d1
        [0.3, 0.2, 0.1, 0.0, 0.5],  # q2: judged, but nothing relevant
        [0.0, 0.1, 0.2, 0.3, 0.4],  # q3: order d4 d3 d2 d1 d0
    ])
    qrels = [{3: 2, 0: 1}, {0: 1}, {2: 0, 4: 0}, {1: 1, -1: 1}]  # q3: one relevant doc is not in the corpus
    out = text_retrieval(rank_order(scores), qrels, ndcg_k=10, mrr_k=10, recall_k=3)
    log2 = np.log2
    ndcg = [(2 / log2(4) + 1 / log2(5)) / (2 / log2(2) + 1 / log2(3)),  # q0: d3 (grade 2) at rank 3, d0 at 4
            1.0,  # q1: d0 first
            (1 / log2(5)) / (1 + 1 / log2(3))]  # q3: d1 at rank 4; ideal has two relevant docs
    assert out["ndcg@10"] == pytest.approx(np.mean(ndcg))
    assert out["mrr@10"] == pytest.approx(np.mean([1 / 3, 1, 1 / 4]))
    assert out["recall@3"] == pytest.approx(np.mean([1 / 2, 1, 0]))  # q0: d3 in top 3, d0 not; q3: none
    assert out["queries_without_relevant"] == 1  # q2 is left out of the means
    # top_k (chunked) gives the same ranking as a full sort
    q, d = np.random.default_rng(0).normal(size=(7, 4)), np.random.default_rng(1).normal(size=(50, 4))
    np.testing.assert_array_equal(top_k(q, d, 10, chunk=3), rank_order(q @ d.T)[:, :10])


def test_text_retrieval_agrees_with_trec_eval():
    """pytrec_eval (trec_eval, what BEIR and MTEB use) on random scores without ties."""
    import pytrec_eval

    rng = np.random.default_rng(0)
    scores = rng.normal(size=(6, 40))
    qrels = [{int(d): int(rng.integers(1, 3)) for d in rng.choice(40, size=rng.integers(1, 5), replace=False)}
             for _ in range(6)]
    ours = text_retrieval(rank_order(scores), qrels, recall_k=20)
    trec_qrels = {f"q{q}": {f"d{d}": g for d, g in rel.items()} for q, rel in enumerate(qrels)}
    run = {f"q{q}": {f"d{d}": float(s) for d, s in enumerate(row)} for q, row in enumerate(scores)}
    trec = pytrec_eval.RelevanceEvaluator(trec_qrels, {"ndcg_cut.10", "recall.20", "recip_rank"}).evaluate(run)
    assert ours["ndcg@10"] == pytest.approx(np.mean([v["ndcg_cut_10"] for v in trec.values()]), abs=1e-6)
    assert ours["recall@20"] == pytest.approx(np.mean([v["recall_20"] for v in trec.values()]), abs=1e-6)
    # trec_eval's recip_rank has no cut-off: given each query's top 10 only, it is MRR@10
    top10 = {q: dict(list(sorted(docs.items(), key=lambda kv: -kv[1]))[:10]) for q, docs in run.items()}
    rr = pytrec_eval.RelevanceEvaluator(trec_qrels, {"recip_rank"}).evaluate(top10)
    assert ours["mrr@10"] == pytest.approx(np.mean([v["recip_rank"] for v in rr.values()]), abs=1e-6)


def test_sts_spearman_by_hand():
    cos = np.array([0.1, 0.4, 0.4, 0.9])
    gold = np.array([1.0, 2.0, 3.0, 2.0])
    e1 = np.tile([1.0, 0.0], (4, 1))
    e2 = np.stack([cos, np.sqrt(1 - cos ** 2)], axis=1)
    # average ranks: cos [1, 2.5, 2.5, 4], gold [1, 2.5, 4, 2.5]; centred [-1.5,0,0,1.5] and [-1.5,0,1.5,0]
    # -> covariance 2.25, variances 4.5 each: rho = 0.5
    assert sts_spearman(e1, e2, gold)["spearman"] == pytest.approx(0.5)


def test_chance_and_text_pairs():
    assert chance_recall_at_1(np.eye(200, dtype=bool)) == pytest.approx(0.005)
    q = np.eye(4)
    p = np.eye(4)[[0, 1, 3, 2]]
    out = text_pair_retrieval(q, p, ks=(1, 2))
    assert out["text_to_text_r1"] == 0.5 and out["text_to_text_r2"] == 0.5 and out["text_chance_r1"] == 0.25
