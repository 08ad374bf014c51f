"""EVA02 image tower (jina-clip v1/v2), spec §3: pre-LN ViT with sub-LN, SwiGLU and 2-D RoPE.

Forward for pixels (B, H, W, 3), NHWC, CLIP-normalised:
  x = [CLS; conv_patches(pixels)] + pos_embed   (patch dropout in training keeps CLS)
  per block: x += proj(inner_attn_ln(attn(norm1 x)));  x += w3(ffn_ln(SiLU(w1 y) * w2 y)), y = norm2 x
  embedding = norm(x)[:, 0]   (CLS pooling)
RoPE: interleaved pairs over the full head dim, applied to patch tokens only (not CLS), after the q/v
biases. k has no bias.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jclip_jax.models.layers import (
    ZEROS,
    constrain_activation,
    dot_product_attention,
    dtype_of,
    layer_norm,
    logical,
    make_stacked,
    run_stacked,
    trunc_normal,
)


def resample_pos_embed(pos_embed: np.ndarray, grid: int) -> np.ndarray:
    """Absolute position embeddings for another grid (a later stage at a higher resolution, e.g. v2's
    224 -> 384 -> 512 px): (1, 1 + g*g, W) -> (1, 1 + grid*grid, W), float32.

    The CLS row is kept; the g x g patch rows are resized bicubically as an image (timm's
    `resample_abs_pos_embed` does the same in torch; jax.image.resize's cubic kernel is Keys' a = -0.5,
    torch's a = -0.75, so values differ slightly from timm's: this is an initialisation, not a conversion).
    RoPE needs nothing: its tables are computed from the grid (`intp_freq` rescales positions to pt_hw_seq_len).
    """
    pos_embed = np.asarray(pos_embed, np.float32)
    n, width = pos_embed.shape[1] - 1, pos_embed.shape[2]
    g = int(round(n ** 0.5))
    if g * g != n:
        raise ValueError(f"pos_embed {pos_embed.shape}: {n} patch rows are not a square grid")
    if g == grid:
        return pos_embed
    patches = jax.image.resize(pos_embed[0, 1:].reshape(g, g, width), (grid, grid, width), "bicubic")
    return np.concatenate([pos_embed[:, :1], np.asarray(patches).reshape(1, grid * grid, width)], axis=1)


def rope_tables(grid: int, head_dim: int, pt_hw_seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """2-D RoPE (cos, sin), float32 (grid*grid, head_dim), rows in row-major patch order.

    Channels [0, head_dim/2) rotate with the patch row, [head_dim/2, head_dim) with the column. Each axis
    uses head_dim/4 frequencies theta_k = 10000^(-k / (head_dim/4)), each repeated twice (interleaved).
    Grid positions are t = arange(grid) * pt_hw_seq_len / grid (= 0..grid-1 when the two agree, as in v1).
    """
    half = head_dim // 2
    theta = 1.0 / (10000.0 ** (np.arange(0, half, 2, dtype=np.float64) / half))  # (head_dim/4,)
    t = np.arange(grid, dtype=np.float64) / grid * pt_hw_seq_len
    per_axis = np.repeat(np.outer(t, theta), 2, axis=1)  # (grid, half): [t*th0, t*th0, t*th1, ...]
    rows = np.repeat(per_axis, grid, axis=0)  # token (r, c) -> row r
    cols = np.tile(per_axis, (grid, 1))  # token (r, c) -> column c
    angles = np.concatenate([rows, cols], axis=1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs: out[2m] = x[2m] cos - x[2m+1] sin, out[2m+1] = x[2m+1] cos + x[2m] sin.

    x: (B, T, heads, head_dim); cos, sin: (B or 1, T, head_dim) float32.
    """
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


class EvaBlock(nnx.Module):
    def __init__(self, cfg, dtype, param_dtype, *, attention: str = "xla", rngs: nnx.Rngs):
        w, hd = cfg.width, cfg.head_width
        if w % hd:
            raise ValueError(f"vision.width={w} is not divisible by vision.head_width={hd}")
        n, hidden, eps = w // hd, int(w * cfg.mlp_ratio), cfg.layer_norm_eps
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads, self.attention_implementation = n, attention
        self.norm1 = layer_norm(w, eps, "embed", dtype, param_dtype, rngs)
        qkv_init = logical(trunc_normal(), "embed", "heads", "kv")
        bias_init = logical(ZEROS, "heads", "kv")
        self.q_proj = nnx.LinearGeneral(w, (n, hd), kernel_init=qkv_init, bias_init=bias_init, **kw)
        self.k_proj = nnx.LinearGeneral(w, (n, hd), use_bias=False, kernel_init=qkv_init, **kw)
        self.v_proj = nnx.LinearGeneral(w, (n, hd), kernel_init=qkv_init, bias_init=bias_init, **kw)
        self.inner_attn_ln = layer_norm(w, eps, "heads", dtype, param_dtype, rngs)  # over merged heads
        self.proj = nnx.Linear(w, w, kernel_init=logical(trunc_normal(), "heads", "embed"),
                               bias_init=logical(ZEROS, "embed"), **kw)
        self.norm2 = layer_norm(w, eps, "embed", dtype, param_dtype, rngs)
        mlp_in = logical(trunc_normal(), "embed", "mlp")
        self.w1 = nnx.Linear(w, hidden, kernel_init=mlp_in, bias_init=logical(ZEROS, "mlp"), **kw)  # gate
        self.w2 = nnx.Linear(w, hidden, kernel_init=mlp_in, bias_init=logical(ZEROS, "mlp"), **kw)  # value
        self.ffn_ln = layer_norm(hidden, eps, "mlp", dtype, param_dtype, rngs)
        self.w3 = nnx.Linear(hidden, w, kernel_init=logical(trunc_normal(), "mlp", "embed"),
                             bias_init=logical(ZEROS, "embed"), **kw)

    def attention(self, x, cos, sin):
        """x: (B, 1+T, W); cos/sin: (B or 1, T, head_dim) for the T patch tokens."""
        heads = lambda a: constrain_activation(a, "batch", None, "heads", None)
        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))  # (B, 1+T, heads, hd)
        q = jnp.concatenate([q[:, :1], apply_rope(q[:, 1:], cos, sin)], axis=1)
        k = jnp.concatenate([k[:, :1], apply_rope(k[:, 1:], cos, sin)], axis=1)
        out = dot_product_attention(q, k, v, implementation=self.attention_implementation)  # no mask
        out = out.reshape(*out.shape[:2], -1)  # merge heads (head-major)
        return self.proj(self.inner_attn_ln(out))

    def __call__(self, x, cos, sin):
        x = x + self.attention(self.norm1(x), cos, sin)
        y = self.norm2(x)
        mlp = lambda a: constrain_activation(a, "batch", None, "mlp")
        return x + self.w3(self.ffn_ln(jax.nn.silu(mlp(self.w1(y))) * mlp(self.w2(y))))


class EvaVisionTower(nnx.Module):
    """pixels (B, H, W, 3) -> CLS embedding (B, width) float32."""

    def __init__(self, cfg, *, dtype="float32", param_dtype="float32", scan_layers=True, remat=False,
                 attention="xla", rngs: nnx.Rngs):
        self.cfg = cfg
        dt, pdt = dtype_of(dtype), dtype_of(param_dtype)
        if cfg.image_size < cfg.patch_size:  # a remainder is fine: the stride-p conv ignores it (v2: 512/14)
            raise ValueError(f"vision.image_size={cfg.image_size} < vision.patch_size={cfg.patch_size}")
        self.grid = cfg.image_size // cfg.patch_size
        self.scan_layers, self.remat, self.dtype = scan_layers, remat, dt
        w, p = cfg.width, cfg.patch_size
        self.patch_embed = nnx.Conv(
            3, w, kernel_size=(p, p), strides=(p, p), padding="VALID", dtype=dt, param_dtype=pdt,
            kernel_init=logical(trunc_normal(), None, None, None, "embed"),
            bias_init=logical(ZEROS, "embed"), rngs=rngs)
        self.cls_token = nnx.Param(logical(trunc_normal(), None, None, "embed")(rngs.params(), (1, 1, w), pdt))
        self.pos_embed = nnx.Param(
            logical(trunc_normal(), None, None, "embed")(rngs.params(), (1, self.grid**2 + 1, w), pdt))
        self.blocks = make_stacked(lambda r: EvaBlock(cfg, dt, pdt, attention=attention, rngs=r), cfg.layers, rngs)
        self.norm = layer_norm(w, cfg.layer_norm_eps, "embed", dt, pdt, rngs)

    def __call__(self, pixels: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        b, h, w_, _ = pixels.shape
        if h != cfg.image_size or w_ != cfg.image_size:
            raise ValueError(f"image tower expects {cfg.image_size}x{cfg.image_size} pixels, got {h}x{w_}")
        x = self.patch_embed(pixels.astype(self.dtype))  # (B, grid, grid, W), row-major below
        x = x.reshape(b, self.grid * self.grid, -1)
        pos = self.pos_embed[...].astype(x.dtype)
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, x.shape[-1])) + pos[:, :1]
        x = x + pos[:, 1:]
        cos, sin = (jnp.asarray(t)[None] for t in rope_tables(self.grid, cfg.head_width, cfg.pt_hw_seq_len))
        if rng is not None and cfg.patch_dropout > 0.0:
            x, cos, sin = patch_dropout(x, cos, sin, cfg.patch_dropout, rng)
        x = jnp.concatenate([cls, x], axis=1)
        x = run_stacked(self.blocks, x, lambda block, y, _: block(y, cos, sin), None,
                        scan=self.scan_layers, remat=self.remat)
        return self.norm(x)[:, 0].astype(jnp.float32)


def patch_dropout(x, cos, sin, rate: float, rng):
    """Keep a random subset of max(1, int(T * (1 - rate))) patch tokens per image, and their RoPE rows.

    x: (B, T, W) patch tokens (CLS is added back by the caller); cos/sin: (1, T, head_dim).
    Returns x (B, K, W), cos/sin (B, K, head_dim).
    """
    b, t, _ = x.shape
    keep = max(1, int(t * (1.0 - rate)))
    idx = jnp.argsort(jax.random.uniform(rng, (b, t)), axis=1)[:, :keep]  # (B, K)
    take = lambda a: jnp.take_along_axis(jnp.broadcast_to(a, (b, *a.shape[1:])), idx[..., None], axis=1)
    return take(x), take(cos), take(sin)
