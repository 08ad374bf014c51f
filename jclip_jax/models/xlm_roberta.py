"""Jina-XLM-RoBERTa text tower (jina-embeddings-v3, jina-clip-v2), spec §5.1 / §5.4: post-LN encoder with
half-split rotary position embeddings, a plain GELU MLP and LoRA on every Linear and Embedding.

Forward for ids (B, L), pad id 1:
  h = LN(word_emb[ids] + token_type_emb[0]); per block (post-LN):
    q, k, v = Wqkv h;  q, k = RoPE(q), RoPE(k)   (half-split, base `rotary_emb_base`, positions 0..L-1)
    h = norm1(h + out_proj(attn(q, k, v, key mask ids != pad)));  h = norm2(h + fc2(GELU(fc1 h)))
  embedding = mean of h over non-pad tokens.
Every Linear/Embedding is a LoRA layer (models/lora.py) applying the config's default task's adapter.

Attention-probability dropout is not applied (fused attention, as in the v1 tower); hidden dropout is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jclip_jax.models.layers import (
    constrain_activation,
    dot_product_attention,
    dropout,
    dtype_of,
    layer_norm,
    make_stacked,
    run_stacked,
)
from jclip_jax.models.lora import LoRAEmbed, LoRALinear


def lora_settings(cfg) -> dict:
    """LoRA kwargs of the tower's layers: n adaptations, rank, alpha and the static default-task index."""
    adaptations = tuple(cfg.lora_adaptations or ())
    if not adaptations:
        return dict(adaptations=0, rank=1, alpha=1.0, task=0)
    if cfg.default_lora_task not in adaptations:
        raise ValueError(f"text.default_lora_task={cfg.default_lora_task!r} is not one of text.lora_adaptations="
                         f"{adaptations}")
    if not (isinstance(cfg.lora_rank, int) and cfg.lora_rank > 0):
        raise ValueError(f"text.lora_rank={cfg.lora_rank!r} must be a positive integer")
    return dict(adaptations=len(adaptations), rank=cfg.lora_rank, alpha=float(cfg.lora_alpha),
                task=adaptations.index(cfg.default_lora_task))


def rope_tables(length: int, head_dim: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    """Half-split RoPE (cos, sin), float32 (length, head_dim): channel d and d + head_dim/2 share the frequency
    base^(-2d/head_dim), d < head_dim/2, at positions 0..length-1 (GPT-NeoX / Llama layout)."""
    inv_freq = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    angles = np.outer(np.arange(length, dtype=np.float64), inv_freq)
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1] over the two halves of the head dim.

    x: (B, L, heads, head_dim); cos, sin: (L, head_dim) float32. Computed in float32.
    """
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos[:, None, :] + rotated * sin[:, None, :]).astype(x.dtype)


class XLMRobertaBlock(nnx.Module):
    """One post-LN block: fused-QKV RoPE attention, then fc1 -> GELU -> fc2; every Linear carries LoRA."""

    def __init__(self, cfg, dtype, param_dtype, *, attention: str = "xla", rngs: nnx.Rngs):
        d, n = cfg.hidden_size, cfg.num_attention_heads
        if d % n:
            raise ValueError(f"text.hidden_size={d} is not divisible by text.num_attention_heads={n}")
        hd, inter = d // n, cfg.intermediate_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, **lora_settings(cfg))
        self.dropout_rate, self.attention_implementation = cfg.hidden_dropout_prob, attention
        # Wqkv output [q | k | v], each head-major: features (3, heads, head_dim), as torch's rows.
        self.wqkv = LoRALinear(d, (3, n, hd), ("embed", None, "heads", "kv"), **kw)
        # out_proj reads the merged heads (head-major), like EVA's proj.
        self.out_proj = LoRALinear(d, (d,), ("heads", "embed"), **kw)
        self.norm1 = layer_norm(d, cfg.layer_norm_eps, "embed", dtype, param_dtype, rngs)
        self.fc1 = LoRALinear(d, (inter,), ("embed", "mlp"), **kw)
        self.fc2 = LoRALinear(inter, (d,), ("mlp", "embed"), **kw)
        self.norm2 = layer_norm(d, cfg.layer_norm_eps, "embed", dtype, param_dtype, rngs)

    def __call__(self, h, cos, sin, key_mask, rng=None):
        """h: (B, L, D); cos/sin: (L, head_dim); key_mask: (B, L) bool, True = real token."""
        rng_attn, rng_mlp = (None, None) if rng is None else jax.random.split(rng)
        qkv = constrain_activation(self.wqkv(h), "batch", None, None, "heads", None)  # (B, L, 3, heads, hd)
        q, k = apply_rope(qkv[:, :, 0], cos, sin), apply_rope(qkv[:, :, 1], cos, sin)
        attn = dot_product_attention(q, k, qkv[:, :, 2], key_mask=key_mask,
                                     implementation=self.attention_implementation)
        attn = attn.reshape(*attn.shape[:2], -1)
        h = self.norm1(h + dropout(self.out_proj(attn), self.dropout_rate, rng_attn))
        hidden = constrain_activation(self.fc1(h), "batch", None, "mlp")  # (B, L, I)
        mlp = self.fc2(jax.nn.gelu(hidden, approximate=False))
        return self.norm2(h + dropout(mlp, self.dropout_rate, rng_mlp))


class XLMRobertaTextTower(nnx.Module):
    """ids (B, L) int32 -> mean-pooled embedding (B, hidden) float32."""

    def __init__(self, cfg, *, dtype="float32", param_dtype="float32", scan_layers=True, remat=False,
                 attention="xla", rngs: nnx.Rngs):
        self.cfg = cfg
        dt, pdt = dtype_of(dtype), dtype_of(param_dtype)
        self.scan_layers, self.remat = scan_layers, remat
        d, lora = cfg.hidden_size, lora_settings(cfg)
        self.word_embeddings = LoRAEmbed(cfg.vocab_size, d, ("vocab", "embed"), dtype=dt, param_dtype=pdt,
                                         rngs=rngs, **lora)
        self.token_type_embeddings = LoRAEmbed(cfg.type_vocab_size, d, (None, "embed"), dtype=dt,
                                               param_dtype=pdt, rngs=rngs, **lora)
        self.emb_ln = layer_norm(d, cfg.layer_norm_eps, "embed", dt, pdt, rngs)
        self.layers = make_stacked(lambda r: XLMRobertaBlock(cfg, dt, pdt, attention=attention, rngs=r),
                                   cfg.num_hidden_layers, rngs)

    def hidden_states(self, ids: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """ids (B, L) int32 -> last hidden states (B, L, hidden) in the compute dtype."""
        cfg = self.cfg
        key_mask = ids != cfg.pad_token_id
        words = self.word_embeddings(ids)
        # token_type_ids are never passed by jina-clip: row 0 (with its LoRA delta) is added to every token.
        token_type = self.token_type_embeddings(jnp.zeros((1,), jnp.int32))[0]
        h = self.emb_ln(words + token_type.astype(words.dtype))
        layer_rngs = None
        if rng is not None:
            rng, emb_rng = jax.random.split(rng)
            h = dropout(h, cfg.hidden_dropout_prob, emb_rng)
            layer_rngs = jax.random.split(rng, cfg.num_hidden_layers)
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        cos, sin = (jnp.asarray(t) for t in rope_tables(ids.shape[1], head_dim, cfg.rotary_emb_base))
        return run_stacked(
            self.layers, h, lambda block, x, r: block(x, cos, sin, key_mask, r), layer_rngs,
            scan=self.scan_layers, remat=self.remat)

    def __call__(self, ids: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        h = self.hidden_states(ids, rng).astype(jnp.float32)
        mask = (ids != self.cfg.pad_token_id).astype(jnp.float32)[..., None]
        # mean_pooler: no epsilon; every sequence holds at least <s> and </s>.
        return (h * mask).sum(axis=1) / mask.sum(axis=1)
