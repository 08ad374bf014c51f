"""The Jina-BERT-v2 text tower against an explicit numpy computation written from the spec (§2).

No pip package ships Jina-BERT-v2, so the reference below reads the torch-layout state dict directly:
Wqkv rows [q | k | v], symmetric ALiBi, post-LN, GeGLU with rows 0..I-1 of gated_layers as the gate.
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from jclip_jax.convert import hf_layout, torch_layout
from jclip_jax.models import configs
from jclip_jax.models.clip import JinaCLIP
from jclip_jax.models.jina_bert import alibi_slopes


def test_alibi_slopes_closed_form():
    for n in (8, 16):  # powers of two: 2^(-8 (h+1) / n)
        np.testing.assert_allclose(alibi_slopes(n), [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)], rtol=1e-12)
    # 12 heads: the 8-head slopes, then every other 16-head slope (spec §2's table)
    expected12 = [2.0**-k for k in range(1, 9)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]
    np.testing.assert_allclose(alibi_slopes(12), expected12, rtol=1e-12)
    np.testing.assert_allclose(alibi_slopes(12)[8:], [0.70710678, 0.35355339, 0.17677670, 0.08838835], atol=1e-8)


def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu(x):
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def numpy_text_tower(sd, cfg, ids, swap_glu_halves=False):
    """Reference forward in float64 from a torch-layout state dict. ids (B, L) -> (B, hidden)."""
    p = lambda k: sd["text_model.transformer." + k].astype(np.float64)
    n_heads, d, inter, eps = cfg.num_attention_heads, cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps
    hd = d // n_heads
    mask = ids != 0
    h = p("embeddings.word_embeddings.weight")[ids] + p("embeddings.token_type_embeddings.weight")[0]
    h = _ln(h, p("emb_ln.weight"), p("emb_ln.bias"), eps)
    length = ids.shape[1]
    slopes = alibi_slopes(n_heads)
    dist = np.abs(np.arange(length)[:, None] - np.arange(length)[None, :])
    alibi = -slopes[:, None, None] * dist  # (heads, L, L)
    for i in range(cfg.num_hidden_layers):
        q_ = lambda k, i=i: p(f"encoder.layers.{i}.{k}")
        qkv = h @ q_("mixer.Wqkv.weight").T + q_("mixer.Wqkv.bias")  # (B, L, 3d)
        q, k, v = (qkv[..., j * d:(j + 1) * d].reshape(*qkv.shape[:2], n_heads, hd) for j in range(3))
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd) + alibi[None]
        scores = np.where(mask[:, None, None, :], scores, -1e30)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(*h.shape[:2], d)
        attn = attn @ q_("mixer.out_proj.weight").T + q_("mixer.out_proj.bias")
        h = _ln(h + attn, q_("norm1.weight"), q_("norm1.bias"), eps)
        g = h @ q_("mlp.gated_layers.weight").T  # (B, L, 2I), no bias
        gate, value = (g[..., inter:], g[..., :inter]) if swap_glu_halves else (g[..., :inter], g[..., inter:])
        mlp = (_gelu(gate) * value) @ q_("mlp.wo.weight").T + q_("mlp.wo.bias")
        h = _ln(h + mlp, q_("norm2.weight"), q_("norm2.bias"), eps)
    m = mask[..., None].astype(np.float64)
    return (h * m).sum(1) / m.sum(1)


@pytest.fixture(scope="module")
def tiny_model():
    cfg = configs.tiny()
    model = JinaCLIP(cfg, rngs=nnx.Rngs(0))
    # randomise LayerNorms and biases too (they start at 1 / 0), so every parameter is exercised
    rng = np.random.default_rng(0)
    params = {k: np.asarray(v) for k, v in hf_layout.flax_params(model).items()}
    params = {k: v + rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in params.items()}
    return hf_layout.merge_params(hf_layout.abstract_model(JinaCLIP, cfg), params)


def _ids():
    rng = np.random.default_rng(1)
    ids = rng.integers(5, 500, size=(3, 11)).astype(np.int32)
    ids[:, 0] = 101
    for row, n in enumerate((11, 7, 4)):
        ids[row, n - 1] = 102
        ids[row, n:] = 0
    return ids


def _torch_sd(model):
    params = {k: np.asarray(v) for k, v in hf_layout.flax_params(model).items()}
    return torch_layout.to_torch(model.cfg, params)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_tower_equals_numpy_reference(tiny_model, num_layers):
    cfg = tiny_model.cfg
    ids = _ids()
    sd = _torch_sd(tiny_model)
    text_cfg = cfg.text.copy_and_resolve_references()
    text_cfg.num_hidden_layers = num_layers
    if num_layers == 1:  # one block: a model whose stack holds only layer 0
        one = cfg.copy_and_resolve_references()
        one.text.num_hidden_layers = 1
        params = {k: (np.asarray(v)[:1] if k[:2] == ("text_model", "layers") else np.asarray(v))
                  for k, v in hf_layout.flax_params(tiny_model).items()}
        model = hf_layout.merge_params(hf_layout.abstract_model(JinaCLIP, one), params)
    else:
        model = tiny_model
    ours = np.asarray(model.text_features(jnp.asarray(ids)))
    ref = numpy_text_tower(sd, text_cfg, ids)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-5)


def test_glu_gate_is_the_first_half(tiny_model):
    """Rows 0..I-1 of gated_layers (torch layout) go through GELU; the other half is the value."""
    ids = _ids()
    sd = _torch_sd(tiny_model)
    ours = np.asarray(tiny_model.text_features(jnp.asarray(ids)))
    gate_first = numpy_text_tower(sd, tiny_model.cfg.text, ids)
    gate_second = numpy_text_tower(sd, tiny_model.cfg.text, ids, swap_glu_halves=True)
    assert np.abs(ours - gate_first).max() < 1e-5
    assert np.abs(ours - gate_second).max() > 1e-2  # the test can tell the two conventions apart


def test_padding_never_changes_real_tokens(tiny_model):
    ids = _ids()[1:2, :7]  # 7 real tokens
    short = np.asarray(tiny_model.text_features(jnp.asarray(ids)))
    for extra in (1, 9, 57):
        padded = np.concatenate([ids, np.zeros((1, extra), np.int32)], axis=1)
        np.testing.assert_allclose(np.asarray(tiny_model.text_features(jnp.asarray(padded))), short, atol=2e-6)
    # and hidden states of the real tokens are unchanged, not only their mean
    h1 = np.asarray(tiny_model.text_model.hidden_states(jnp.asarray(ids)))
    h2 = np.asarray(tiny_model.text_model.hidden_states(jnp.asarray(np.pad(ids, ((0, 0), (0, 5))))))
    np.testing.assert_allclose(h2[:, :7], h1, atol=2e-6)


def test_bf16_compute_stays_close_to_fp32(tiny_model):
    cfg = tiny_model.cfg.copy_and_resolve_references()
    cfg.dtype = "bfloat16"
    params = {k: np.asarray(v) for k, v in hf_layout.flax_params(tiny_model).items()}
    bf16 = hf_layout.merge_params(hf_layout.abstract_model(JinaCLIP, cfg), params)
    assert bf16.text_model.layers.wqkv.kernel[...].dtype == jnp.float32  # fp32 master params
    ids = jnp.asarray(_ids())
    a, b = np.asarray(tiny_model.text_features(ids)), np.asarray(bf16.text_features(ids))
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() > 0.99
