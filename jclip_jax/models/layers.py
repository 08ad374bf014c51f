"""Building blocks shared by both towers: logical-axis initialisers, dropout, and the layer stack.

Logical axis names used by every parameter (the sharding rules map them to mesh axes):
  'vocab'  token-embedding rows          'embed'  model width (residual stream)
  'heads'  attention heads (also the merged heads*head_dim axis, which is head-major)
  'kv'     per-head feature dim          'mlp'    feed-forward hidden width
  'layers' the stacked-block axis        None     never sharded (tiny or structural axes)
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str):
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; known: {sorted(DTYPES)}")
    return DTYPES[name]


def logical(init, *names):
    """Tag an initialiser with logical axis names.

    `eager_sharding=False`: the names are logical, not mesh axes, so flax must not try to shard the
    value at creation; the sharding rules (jclip_jax/sharding.py) resolve them later.
    """
    return nnx.with_partitioning(init, tuple(names), eager_sharding=False)


def trunc_normal(std: float = 0.02):
    return nnx.initializers.truncated_normal(stddev=std)


ZEROS = nnx.initializers.zeros_init()
ONES = nnx.initializers.ones_init()


def layer_norm(dim: int, eps: float, axis_name: str | None, dtype, param_dtype, rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        dim, epsilon=eps, dtype=dtype, param_dtype=param_dtype,
        scale_init=logical(ONES, axis_name), bias_init=logical(ZEROS, axis_name), rngs=rngs,
    )


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout driven by an explicit key (None = deterministic).

    Hand-written rather than nnx.Dropout because the blocks run under `lax.scan`, where an explicit
    per-layer key is simpler and reproducible than threading stateful `nnx.Rngs` through the scan.
    """
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def make_stacked(make_block: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs):
    """Create `num_layers` blocks whose params are stacked on a leading 'layers' axis."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(rngs):
        return make_block(rngs)

    return create(rngs)


def run_stacked(
    blocks: nnx.Module,
    h: jax.Array,
    apply_block: Callable,
    layer_rngs: jax.Array | None,
    *,
    scan: bool,
    remat: bool,
) -> jax.Array:
    """h -> apply_block(block_i, h, rng_i) for i = 0..L-1 over stacked `blocks`.

    scan=True traces one block and loops with `lax.scan` (compile time flat in depth); scan=False
    unrolls. remat=True rematerialises each block in the backward pass (activation memory O(1 block)).
    `layer_rngs`: (L, 2) uint32 keys, or None for deterministic.
    """
    graphdef, stacked_state = nnx.split(blocks)

    def body(carry, xs):
        layer_state, rng = xs
        return apply_block(nnx.merge(graphdef, layer_state), carry, rng), None

    if remat:
        body = jax.checkpoint(body, prevent_cse=not scan, policy=jax.checkpoint_policies.nothing_saveable)
    if scan:
        h, _ = jax.lax.scan(body, h, (stacked_state, layer_rngs))
        return h
    num_layers = jax.tree.leaves(stacked_state)[0].shape[0]
    for i in range(num_layers):
        h, _ = body(h, jax.tree.map(lambda x, i=i: x[i], (stacked_state, layer_rngs)))
    return h
