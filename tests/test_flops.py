"""Analytic FLOPs against counts derived by hand for tiny shapes, and the parameter-count rule of thumb."""

import ml_collections
import pytest

from jclip_jax.models import configs
from jclip_jax.training.flops import image_forward_flops, text_forward_flops, train_step_flops


def test_text_flops_by_hand():
    cfg = ml_collections.ConfigDict(dict(hidden_size=4, intermediate_size=8, num_hidden_layers=1))
    # per token: qkv 2*4*12=96, out 2*4*4=32, gated 2*4*16=128, wo 2*8*4=64, scores+AV 4*L*d = 4*3*4=48
    assert text_forward_flops(cfg, seq_len=3) == 3 * (96 + 32 + 128 + 64 + 48)


def test_image_flops_by_hand():
    cfg = ml_collections.ConfigDict(dict(width=4, mlp_ratio=2.0, image_size=4, patch_size=2, layers=1))
    # grid 2x2 = 4 patches, 5 tokens; patch conv 2*4*(3*4)*4 = 384
    # per token: q,k,v,proj 2*4*16 = 128, w1,w2 2*2*4*8 = 128, w3 2*8*4 = 64, attention 4*5*4 = 80
    assert image_forward_flops(cfg) == 384 + 5 * (128 + 128 + 64 + 80)


def test_v1_matches_the_2_flops_per_param_rule():
    cfg = configs.jina_clip_v1()
    image = image_forward_flops(cfg.vision)
    # ~2 x 85.8M params x 197 tokens, plus attention: within 10% of 35 GFLOPs (design notes' ViT-B/16)
    assert image == pytest.approx(35e9, rel=0.1)
    text = text_forward_flops(cfg.text, 77)
    body_params = 12 * (4 * 768 * 768 + 3 * 768 * 3072)
    assert text == pytest.approx(2 * body_params * 77, rel=0.05)
    assert train_step_flops(cfg, 2, 3, 77) == pytest.approx(3 * (2 * (image + text) + 3 * 2 * text))
    # captions of another length than the text pairs (stage 1 of a config with image_max_length 32): the
    # captions at 32 tokens, the pairs (query, positive, 7 negatives) at 77
    caption = text_forward_flops(cfg.text, 32)
    assert train_step_flops(cfg, 2, 3, 77, negatives_per_query=7, caption_len=32) == pytest.approx(
        3 * (2 * (image + caption) + 3 * 9 * text))


def test_v2_text_flops_by_hand():
    cfg = configs.xlm_roberta_text_config(hidden_size=4, intermediate_size=8, num_hidden_layers=1)
    # per token: qkv 2*4*12=96, out 2*4*4=32, fc1 2*4*8=64 (no GLU), fc2 2*8*4=64, scores+AV 4*3*4=48
    assert text_forward_flops(cfg, seq_len=3) == 3 * (96 + 32 + 64 + 64 + 48)
