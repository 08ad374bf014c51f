"""Jina-BERT-v2 text tower (jina-clip-v1), spec §2: post-LN BERT with symmetric ALiBi and a GeGLU MLP.

Forward for ids (B, L), pad id 0:
  h = LN(word_emb[ids] + token_type_emb[0]); per block (post-LN):
    h = norm1(h + out_proj(attn(Wqkv h)));  h = norm2(h + wo(GELU(gate) * value))
  embedding = mean of h over non-pad tokens (including [CLS] and [SEP]).

GLU convention (spec §2 and §7, [D]): of `gated_layers`' 2*I outputs, the FIRST I (torch rows 0..I-1)
are the gate that goes through GELU, the second I the value. Here the kernel is stored as
(hidden, 2, I) and index 0 of the middle axis is the gate; the checkpoint converter is the one place
that maps torch rows to that axis.

Attention-probability dropout is not applied: it would keep XLA from using a fused attention kernel
(hidden dropout after attention and MLP, and embedding dropout, are applied in training).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jclip_jax.models.layers import (
    ZEROS,
    constrain_activation,
    dropout,
    dtype_of,
    embedding_lookup,
    layer_norm,
    logical,
    make_stacked,
    run_stacked,
    trunc_normal,
)


def alibi_slopes(num_heads: int) -> np.ndarray:
    """Press et al.'s ALiBi slopes, float64 (num_heads,).

    For n a power of two: slope_h = 2^(-8(h+1)/n). Otherwise take the slopes of the closest power of two
    below n, then every other slope of twice that power for the remaining heads.
    """
    def power_of_two_slopes(n):
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        return np.asarray(power_of_two_slopes(num_heads))
    closest = 2 ** math.floor(math.log2(num_heads))
    extra = power_of_two_slopes(2 * closest)[0::2][: num_heads - closest]
    return np.asarray(power_of_two_slopes(closest) + extra)


def alibi_bias(num_heads: int, length: int) -> jax.Array:
    """Symmetric ALiBi bias -slope_h * |i - j|, float32 (1, num_heads, length, length)."""
    pos = jnp.arange(length)
    distance = jnp.abs(pos[:, None] - pos[None, :]).astype(jnp.float32)
    slopes = jnp.asarray(alibi_slopes(num_heads), jnp.float32)
    return (-slopes[:, None, None] * distance)[None]


class JinaBertBlock(nnx.Module):
    """One post-LN block: fused-QKV ALiBi attention, then GeGLU MLP."""

    def __init__(self, cfg, dtype, param_dtype, *, rngs: nnx.Rngs):
        d, n = cfg.hidden_size, cfg.num_attention_heads
        if d % n:
            raise ValueError(f"text.hidden_size={d} is not divisible by text.num_attention_heads={n}")
        hd, inter = d // n, cfg.intermediate_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads, self.dropout_rate = n, cfg.hidden_dropout_prob
        # Wqkv output is [q | k | v], each head-major: features (3, heads, head_dim).
        self.wqkv = nnx.LinearGeneral(
            d, (3, n, hd), kernel_init=logical(trunc_normal(), "embed", None, "heads", "kv"),
            bias_init=logical(ZEROS, None, "heads", "kv"), **kw)
        self.out_proj = nnx.LinearGeneral(
            (n, hd), d, axis=(-2, -1), kernel_init=logical(trunc_normal(), "heads", "kv", "embed"),
            bias_init=logical(ZEROS, "embed"), **kw)
        self.norm1 = layer_norm(d, cfg.layer_norm_eps, "embed", dtype, param_dtype, rngs)
        # gated_layers output (2, I): index 0 = gate (-> GELU), index 1 = value. No bias, as in JinaBERT.
        self.gated_layers = nnx.LinearGeneral(
            d, (2, inter), use_bias=False, kernel_init=logical(trunc_normal(), "embed", None, "mlp"), **kw)
        self.wo = nnx.Linear(inter, d, kernel_init=logical(trunc_normal(), "mlp", "embed"),
                             bias_init=logical(ZEROS, "embed"), **kw)
        self.norm2 = layer_norm(d, cfg.layer_norm_eps, "embed", dtype, param_dtype, rngs)

    def __call__(self, h, bias, key_mask, rng=None):
        """h: (B, L, D); bias: (1, heads, L, L) ALiBi; key_mask: (B, L) bool, True = real token."""
        rng_attn, rng_mlp = (None, None) if rng is None else jax.random.split(rng)
        qkv = constrain_activation(self.wqkv(h), "batch", None, None, "heads", None)  # (B, L, 3, heads, hd)
        attn = jax.nn.dot_product_attention(
            qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
            bias=bias.astype(qkv.dtype), mask=key_mask[:, None, None, :])
        h = self.norm1(h + dropout(self.out_proj(attn), self.dropout_rate, rng_attn))
        gate_value = constrain_activation(self.gated_layers(h), "batch", None, None, "mlp")  # (B, L, 2, I)
        mlp = jax.nn.gelu(gate_value[..., 0, :], approximate=False) * gate_value[..., 1, :]
        return self.norm2(h + dropout(self.wo(mlp), self.dropout_rate, rng_mlp))


class JinaBertTextTower(nnx.Module):
    """ids (B, L) int32 -> mean-pooled embedding (B, hidden) float32."""

    def __init__(self, cfg, *, dtype="float32", param_dtype="float32", scan_layers=True, remat=False,
                 attention="xla", rngs: nnx.Rngs):
        del attention  # ALiBi: the TPU flash kernel takes no bias, so this tower always runs XLA's attention
        self.cfg = cfg
        dt, pdt = dtype_of(dtype), dtype_of(param_dtype)
        self.scan_layers, self.remat = scan_layers, remat
        d = cfg.hidden_size
        self.word_embeddings = nnx.Embed(
            cfg.vocab_size, d, dtype=dt, param_dtype=pdt,
            embedding_init=logical(trunc_normal(), "vocab", "embed"), rngs=rngs)
        self.token_type_embeddings = nnx.Embed(
            cfg.type_vocab_size, d, dtype=dt, param_dtype=pdt,
            embedding_init=logical(trunc_normal(), None, "embed"), rngs=rngs)
        self.emb_ln = layer_norm(d, cfg.layer_norm_eps, "embed", dt, pdt, rngs)
        self.layers = make_stacked(lambda r: JinaBertBlock(cfg, dt, pdt, rngs=r), cfg.num_hidden_layers, rngs)

    def hidden_states(self, ids: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """ids (B, L) int32 -> last hidden states (B, L, hidden) in the compute dtype."""
        cfg = self.cfg
        key_mask = ids != cfg.pad_token_id
        # token_type_ids are never passed by jina-clip: row 0 is added to every token.
        words = embedding_lookup(self.word_embeddings.embedding[...], ids, self.word_embeddings.dtype)
        h = self.emb_ln(words + self.token_type_embeddings.embedding[...][0].astype(words.dtype))
        layer_rngs = None
        if rng is not None:
            rng, emb_rng = jax.random.split(rng)
            h = dropout(h, cfg.hidden_dropout_prob, emb_rng)
            layer_rngs = jax.random.split(rng, cfg.num_hidden_layers)
        bias = alibi_bias(cfg.num_attention_heads, ids.shape[1])
        return run_stacked(
            self.layers, h, lambda block, x, r: block(x, bias, key_mask, r), layer_rngs,
            scan=self.scan_layers, remat=self.remat)

    def __call__(self, ids: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        h = self.hidden_states(ids, rng).astype(jnp.float32)
        mask = (ids != self.cfg.pad_token_id).astype(jnp.float32)[..., None]
        # MeanPooler: no epsilon; every sequence holds at least [CLS] and [SEP].
        return (h * mask).sum(axis=1) / mask.sum(axis=1)
