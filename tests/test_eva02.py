"""The EVA02 image tower against timm's `Eva` (an independent PyTorch implementation), float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from torch_compat import import_timm

from jclip_jax.convert.towers import import_timm_eva02
from jclip_jax.models import configs
from jclip_jax.models.clip import JinaCLIP
from jclip_jax.models.eva02 import patch_dropout, rope_tables

timm = import_timm()


def _normalised(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def _timm_eva(img, patch, width, depth, heads):
    torch.manual_seed(0)
    grid = img // patch
    model = timm.create_model(
        "eva02_base_patch16_clip_224", pretrained=False, num_classes=0, img_size=img, patch_size=patch,
        embed_dim=width, depth=depth, num_heads=heads, ref_feat_shape=(grid, grid)).eval()
    with torch.no_grad():  # timm zero-inits biases and norms: randomise everything so each weight counts
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _compare(cfg, tmodel, batch=2):
    model = JinaCLIP(cfg, rngs=nnx.Rngs(1))
    ignored = import_timm_eva02(model, {k: v.numpy() for k, v in tmodel.state_dict().items()})
    assert ignored == []
    x = torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = tmodel(x).numpy()
    ours = np.asarray(model.image_features(jnp.asarray(x.numpy().transpose(0, 2, 3, 1))))
    return np.abs(_normalised(ours) - _normalised(ref)).max()


@pytest.mark.parametrize("scan_layers,remat", [(True, False), (False, True)])
def test_tiny_tower_matches_timm(scan_layers, remat):
    cfg = configs.tiny(scan_layers=scan_layers, remat=remat)
    assert _compare(cfg, _timm_eva(32, 8, 64, 2, 4), batch=3) <= 1e-4


def test_v1_width_tower_matches_timm():
    """jina-clip-v1's exact block (width 768, 12 heads, SwiGLU 2048, 224 px / patch 16), one layer deep."""
    cfg = configs.jina_clip_v1()
    cfg.vision.layers = 1
    cfg.text = configs.tiny().text
    cfg.text.hidden_size = 768
    assert _compare(cfg, _timm_eva(224, 16, 768, 1, 12)) <= 1e-4


def test_v2_eva02_large_at_512_matches_timm():
    """jina-clip-v2's image tower: timm's eva02_large_patch14_clip_224 built at img_size=512 (grid 36, 8 pixels
    the stride-14 conv never reads, RoPE ref_feat_shape 16 -> positions k*16/36), one block deep."""
    torch.manual_seed(0)
    tmodel = timm.create_model("eva02_large_patch14_clip_224", pretrained=False, num_classes=0, img_size=512,
                               depth=1).eval()
    assert tmodel.pos_embed.shape == (1, 1297, 1024)
    with torch.no_grad():
        for p in tmodel.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    cfg = configs.jina_clip_v2()
    cfg.vision.layers = 1
    cfg.text = configs.tiny_v2().text
    err = _compare(cfg, tmodel, batch=1)
    print(f"EVA02-L/14 @ 512 parity vs timm: max |diff| {err:.2e}")
    assert err <= 1e-4


def test_rope_table_entries_follow_the_closed_form():
    grid, head_dim = 14, 64
    cos, sin = rope_tables(grid, head_dim, pt_hw_seq_len=14)
    assert cos.shape == (196, 64)
    r, c = 5, 9
    token = r * grid + c
    for d in (0, 1, 6, 31, 32, 33, 50, 63):
        k = (d % 32) // 2
        theta = 10000.0 ** (-k / 16)
        angle = (r if d < 32 else c) * theta
        assert np.isclose(cos[token, d], np.cos(angle), atol=1e-6)
        assert np.isclose(sin[token, d], np.sin(angle), atol=1e-6)
    # v2-style interpolation: positions k * pt / grid
    cos2, _ = rope_tables(36, 64, pt_hw_seq_len=16)
    assert np.isclose(cos2[1 * 36 + 0, 2], np.cos(16 / 36 * 10000.0 ** (-1 / 16)), atol=1e-6)


def test_patch_dropout_keeps_matching_rope_rows():
    b, t, w, hd = 3, 16, 8, 4
    x = jnp.arange(b * t * w, dtype=jnp.float32).reshape(b, t, w)
    cos = jnp.arange(t * hd, dtype=jnp.float32).reshape(1, t, hd)
    sin = -cos
    xk, ck, sk = patch_dropout(x, cos, sin, 0.25, jax.random.key(0))
    assert xk.shape == (b, 12, w) and ck.shape == (b, 12, hd)
    for i in range(b):
        kept = np.asarray(xk[i, :, 0] - x[i, 0, 0]).astype(int) // w  # token index of each kept row
        assert len(set(kept.tolist())) == 12
        np.testing.assert_array_equal(np.asarray(ck[i]), np.asarray(cos[0, kept]))
        np.testing.assert_array_equal(np.asarray(sk[i]), np.asarray(sin[0, kept]))


def test_training_mode_uses_patch_dropout_and_is_reproducible():
    model = JinaCLIP(configs.tiny(), rngs=nnx.Rngs(0))
    px = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    a = model.image_features(px, rng=jax.random.key(5))
    b = model.image_features(px, rng=jax.random.key(5))
    c = model.image_features(px)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(a - c)).max() > 1e-4


def test_wrong_image_size_is_a_clear_error():
    model = JinaCLIP(configs.tiny(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="expects 32x32"):
        model.image_features(jnp.zeros((1, 48, 48, 3)))
