"""Building blocks shared by both towers: logical-axis initialisers, dropout, the layer stack, attention.

Logical axis names used by every parameter (the sharding rules map them to mesh axes):
  'vocab'  token-embedding rows          'embed'  model width (residual stream)
  'heads'  attention heads (also the merged heads*head_dim axis, which is head-major)
  'kv'     per-head feature dim          'mlp'    feed-forward hidden width
  'layers' the stacked-block axis        None     never sharded (tiny or structural axes)

Attention (`dot_product_attention`): XLA's, or a fused kernel that keeps the scores on chip, chosen by
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

import contextlib
import contextvars
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

# Names for config.model.remat_policy: what each rematerialised block keeps for the backward pass.
REMAT_POLICIES = {
    "nothing": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep projection outputs, not attention
    "everything": jax.checkpoint_policies.everything_saveable,  # keep all (remat off, still one scan body)
}

# (mesh, rules) while the train step is traced (`activation_sharding`); None elsewhere (no constraints).
_ACTIVATION_MESH = contextvars.ContextVar("activation_mesh", default=None)

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


@contextlib.contextmanager
def activation_sharding(mesh, rules, enabled: bool = True):
    """Within this context, `constrain_activation` pins activations to the mesh by logical names
    (enabled=False, config.activation_constraints: leave them to GSPMD, as outside the context).

    The train step traces the model inside it. Why: with an 'fsdp' axis the parameters are sharded on
    'embed', and GSPMD would otherwise carry that onto the activations (width split over 'fsdp', the rows
    only over 'data', a full all-reduce after every matmul). Pinned activations keep rows over all batch
    axes and the width whole, so FSDP all-gathers each layer's weights and reduce-scatters their gradients.
    """
    token = _ACTIVATION_MESH.set((mesh, rules) if enabled else None)
    try:
        yield
    finally:
        _ACTIVATION_MESH.reset(token)


def activation_mesh():
    """(mesh, rules) while the train step is traced inside `activation_sharding`, else None."""
    return _ACTIVATION_MESH.get()


def constrain_activation(x: jax.Array, *names: str | None) -> jax.Array:
    """Sharding constraint on an activation by logical axis names, one per dimension of x.

    'batch' = the rows (mapped to the batch mesh axes), 'heads' / 'mlp' = tensor-parallel dimensions, None
    = unsharded (e.g. the sequence and the model width). A no-op outside `activation_sharding`.
    Example: h = constrain_activation(h, "batch", None, None)   # (B, L, D) residual stream
    """
    context = _ACTIVATION_MESH.get()
    if context is None:
        return x
    from jclip_jax import sharding  # the rules live there; imported here to keep the models mesh-agnostic

    mesh, rules = context
    spec = sharding.logical_to_mesh_spec(names, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))


def embedding_lookup(table: jax.Array, ids: jax.Array, dtype, names=("vocab", "embed")) -> jax.Array:
    """table (V, D) with logical axes `names`, ids (...) int -> table[ids] (..., D) in `dtype`.

    Why not a plain `jnp.take`: with FSDP the table is split along D over 'fsdp', and GSPMD all-gathers the
    whole table for a batch-sharded lookup (v2's 250,002 x 1,024 table: 0.5 GiB in bf16 per lookup) and
    scatter-adds its gradient into a whole-table buffer. Here the ids (a few MB) are gathered over the mesh
    axes that split D, each device looks up its D-slice of those rows (no communication), and one
    all-to-all hands every device its own rows whole; the gradient stays a D-slice. Outside
    `activation_sharding`, or when the vocabulary itself is sharded, it is the plain lookup.
    """
    plain = lambda: constrain_activation(
        jnp.take(table, ids, axis=0).astype(dtype), "batch", *(None,) * ids.ndim)
    context = _ACTIVATION_MESH.get()
    if context is None:
        return plain()
    from jclip_jax import sharding

    mesh, rules = context
    axes = lambda spec: (spec,) if isinstance(spec, str) else tuple(spec or ())
    split = lambda spec: math.prod(mesh.shape[a] for a in axes(spec))  # size-1 axes split nothing
    vocab, width = sharding.logical_to_mesh_spec(names, table.shape, mesh, rules)
    rows = sharding.logical_to_mesh_spec(("batch",) + (None,) * (ids.ndim - 1), ids.shape, mesh, rules)[0]
    if split(width) == 1 or split(vocab) > 1:
        return plain()
    kept = tuple(a for a in axes(rows) if a not in axes(width))
    kept = kept[0] if len(kept) == 1 else (kept or None)
    pin = lambda x, *spec: jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, P(*spec)))
    ids = pin(ids, kept, *(None,) * (ids.ndim - 1))
    out = pin(jnp.take(table, ids, axis=0).astype(dtype), kept, *(None,) * (ids.ndim - 1), width)
    return constrain_activation(out, "batch", *(None,) * ids.ndim)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||_2, eps) along `axis` (torch F.normalize semantics). The one L2 normalisation: the
    losses, the model's forward and (through inference.normalize_rows) every evaluation use it."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


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
    remat: bool | str,
) -> jax.Array:
    """h -> apply_block(block_i, h, rng_i) for i = 0..L-1 over stacked `blocks`.

    scan=True traces one block and loops with `lax.scan` (compile time flat in depth); scan=False
    unrolls. remat=True (or a REMAT_POLICIES name; True = 'nothing') rematerialises each block in the
    backward pass, keeping only what the policy saves (activation memory O(1 block) for 'nothing').
    `layer_rngs`: (L, 2) uint32 keys, or None for deterministic.
    """
    graphdef, stacked_state = nnx.split(blocks)

    def body(carry, xs):
        layer_state, rng = xs
        carry = constrain_activation(carry, "batch", *(None,) * (carry.ndim - 1))
        out = apply_block(nnx.merge(graphdef, layer_state), carry, rng)
        return constrain_activation(out, "batch", *(None,) * (out.ndim - 1)), None

    if remat:
        name = "nothing" if remat is True else remat
        if name not in REMAT_POLICIES:
            raise ValueError(f"model.remat_policy={name!r}; known: {sorted(REMAT_POLICIES)}")
        body = jax.checkpoint(body, prevent_cse=not scan, policy=REMAT_POLICIES[name])
    if scan:
        h, _ = jax.lax.scan(body, h, (stacked_state, layer_rngs))
        return h
    num_layers = jax.tree.leaves(stacked_state)[0].shape[0]
    for i in range(num_layers):
        h, _ = body(h, jax.tree.map(lambda x, i=i: x[i], (stacked_state, layer_rngs)))
    return h


# ---------------------------------------------------------------------------------------------- attention

ATTENTION_IMPLEMENTATIONS = ("xla", "flash")
FLASH_BLOCK = 128  # the TPU kernel's default block length: sequences are padded to a multiple of it
FP32_PRECISIONS = ("highest", "float32", "tensorfloat32", "high", "bfloat16_3x", "ANY_F32_F32_F32")


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, key_mask: jax.Array | None = None,
                          bias: jax.Array | None = None, implementation: str = "xla") -> jax.Array:
    """softmax(q k^T / sqrt(head_dim) + bias) v, over keys where key_mask is True.

    q, k, v: (B, T, heads, head_dim); key_mask: (B, T) bool or None; bias: broadcastable to
    (B, heads, T, T) or None (XLA only: a bias keeps the XLA path). Returns (B, T, heads, head_dim).
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"model.attention={implementation!r}; known: {ATTENTION_IMPLEMENTATIONS}")
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
    context = activation_mesh()
    return context[0].devices.flat[0].platform if context is not None else jax.default_backend()


def _sharded(kernel, q, k, v, key_mask):
    """kernel(q, k, v, key_mask) on each device's rows (and heads, under 'tensor') of the batch."""
    context = activation_mesh()
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
    pad = -t % FLASH_BLOCK
    to_kernel = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
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
