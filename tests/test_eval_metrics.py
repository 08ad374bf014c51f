"""Recall@k on hand-built similarity matrices whose answers can be read off by eye."""

import numpy as np
import pytest

from jclip_jax.evaluate import chance_recall_at_1, image_text_retrieval, recall_at_k, text_pair_retrieval


def test_recall_at_k_by_hand():
    sim = np.array([[0.9, 0.1, 0.5],   # relevant = 0 -> rank 0
                    [0.9, 0.1, 0.5],   # relevant = 2 -> rank 1
                    [0.9, 0.8, 0.5]])  # relevant = 2 -> rank 2
    relevant = np.eye(3, dtype=bool)[[0, 2, 2]]
    assert recall_at_k(sim, relevant, ks=(1, 2, 3)) == {1: 1 / 3, 2: 2 / 3, 3: 1.0}
    with pytest.raises(ValueError, match="at least one relevant"):
        recall_at_k(sim, np.zeros((3, 3), bool))


def test_image_text_retrieval_with_several_captions_per_image():
    image = np.array([[1.0, 0.0], [0.0, 1.0]])
    text = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.8, 0.6]])
    owner = np.array([0, 0, 1, 1])  # captions 0,1 -> image 0; 2,3 -> image 1
    out = image_text_retrieval(image, text, owner, ks=(1,))
    # image 0: best caption 0 (its own); image 1: best caption 2 (its own)
    assert out["image_to_text_r1"] == 1.0
    # caption 1 (0.6, 0.8) is closer to image 1, caption 3 (0.8, 0.6) closer to image 0: 2 of 4 right
    assert out["text_to_image_r1"] == 0.5
    assert out["chance_r1"] == 0.5  # image->text: 2 relevant of 4; text->image: 1 of 2


def test_chance_and_text_pairs():
    assert chance_recall_at_1(np.eye(200, dtype=bool)) == pytest.approx(0.005)
    q = np.eye(4)
    p = np.eye(4)[[0, 1, 3, 2]]
    out = text_pair_retrieval(q, p, ks=(1, 2))
    assert out["text_to_text_r1"] == 0.5 and out["text_to_text_r2"] == 0.5 and out["text_chance_r1"] == 0.25
