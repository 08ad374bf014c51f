"""Scaled dot-product attention for the towers: XLA's, or a fused kernel that keeps the scores on chip.

`config.model.attention`:
  'xla'    jax.nn.dot_product_attention lowered by XLA. The (B, heads, T, T) fp32 logits are written to HBM
           and read back several times (softmax, its backward, the remat recompute): at 512 tokens they are
           the largest temporaries of a step and most of its HBM traffic.
  'flash'  a fused kernel. TPU: Pallas' flash attention (jax.experimental.pallas.ops.tpu.flash_attention),
           run per device inside a shard_map (GSPMD cannot partition a custom kernel); the key-padding mask
           becomes segment ids and the sequence is padded to the kernel's 128-token blocks. GPU: cuDNN's
           (jax.nn.dot_product_attention(implementation='cudnn')). Neither is available on CPU.
           JinaBERT's ALiBi bias is not supported by the TPU kernel, so jina-clip-v1's text tower keeps
           'xla'; EVA02 (both versions) and jina-clip-v2's XLM-RoBERTa use the kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jclip_jax.models import layers

IMPLEMENTATIONS = ("xla", "flash")
BLOCK = 128  # the TPU kernel's default block length: sequences are padded to a multiple of it
FP32_PRECISIONS = ("highest", "float32", "tensorfloat32", "high", "bfloat16_3x", "ANY_F32_F32_F32")


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, key_mask: jax.Array | None = None,
                          bias: jax.Array | None = None, implementation: str = "xla") -> jax.Array:
    """softmax(q k^T / sqrt(head_dim) + bias) v, over keys where key_mask is True.

    q, k, v: (B, T, heads, head_dim); key_mask: (B, T) bool or None; bias: broadcastable to
    (B, heads, T, T) or None (XLA only: a bias keeps the XLA path). Returns (B, T, heads, head_dim).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention={implementation!r}; known: {IMPLEMENTATIONS}")
    mask = None if key_mask is None else key_mask[:, None, None, :]
    if implementation == "xla" or bias is not None:
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask)
    platform = _platform()
    if platform == "gpu":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    if platform != "tpu":
        raise ValueError(f"model.attention='flash' needs a TPU or a GPU; this step runs on {platform!r} "
                         "(use model.attention='xla')")
    precision = jax.config.jax_default_matmul_precision
    if precision in FP32_PRECISIONS:  # the kernel's bf16 dots would be lowered at fp32 contract precision
        raise ValueError(f"model.attention='flash' cannot compile under jax_default_matmul_precision="
                         f"{precision!r} (Pallas' kernel has bf16 dots); unset it or use model.attention='xla'")
    return _sharded(_tpu_flash, q, k, v, key_mask)


def _platform() -> str:
    """The platform the step is traced for: the mesh's devices (AOT compiles target TPU from a CPU host)."""
    context = layers.activation_mesh()
    return context[0].devices.flat[0].platform if context is not None else jax.default_backend()


def _sharded(kernel, q, k, v, key_mask):
    """kernel(q, k, v, key_mask) on each device's rows (and heads, under 'tensor') of the batch."""
    context = layers.activation_mesh()
    if context is None:
        return kernel(q, k, v, key_mask)
    from jclip_jax import sharding

    mesh, rules = context
    spec = sharding.logical_to_mesh_spec(("batch", None, "heads", None), q.shape, mesh, rules)
    rows = P(spec[0], None)
    if key_mask is None:
        return jax.shard_map(lambda q, k, v: kernel(q, k, v, None), mesh=mesh, in_specs=(spec,) * 3,
                             out_specs=spec, check_vma=False)(q, k, v)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(spec,) * 3 + (rows,), out_specs=spec,
                         check_vma=False)(q, k, v, key_mask)


def _tpu_flash(q, k, v, key_mask):
    """Pallas' TPU flash attention on (B, T, heads, head_dim) arrays of one device."""
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    b, t, _, head_dim = q.shape
    pad = -t % BLOCK
    to_kernel = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)  # noqa: E731
    segment_ids = None
    if pad or key_mask is not None:
        # A query attends to keys of its own segment: real positions are 1, padded ones 0, and keys that
        # key_mask drops are 0 too. Padded queries then see the padded keys (defined, and discarded).
        real = jnp.broadcast_to(jnp.arange(t + pad) < t, (b, t + pad))
        keys = real if key_mask is None else jnp.pad(key_mask, ((0, 0), (0, pad)))
        segment_ids = fa.SegmentIds(q=real.astype(jnp.int32), kv=keys.astype(jnp.int32))
    out = fa.flash_attention(to_kernel(q), to_kernel(k), to_kernel(v), segment_ids=segment_ids,
                             sm_scale=head_dim**-0.5)
    return out.transpose(0, 2, 1, 3)[:, :t]
