"""Contrastive losses of jina-clip (paper §4.2, eq. 1-3), on one device and sharded over the batch.

Conventions (all embeddings float32):
  q, p        (B, D)     L2-normalised query / passage embeddings; row i of q matches row i of p.
  negatives   (B, K, D)  L2-normalised hard negatives of each query (K = 7 in stage 3).
  scale       ()         1 / tau: fixed 1 / 0.05 for text pairs; exp(logit_scale) for image-text.

`infonce` is the paper's L_nce, the SUM of the two directions (so it is 2x open_clip's ClipLoss, which
averages them); `infonce_hard_negatives` is L_nce+ (eq. 2). Both are full-matrix single-device forms:
the references that the sharded forms below are tested against.

Across devices (`sharded_infonce`), each device holds its own rows of q, p (and negatives). It computes
the log-sum-exp of only its own rows of the logits against all columns, in both directions, so no device
ever holds a global x global matrix:
  'plain': all-gather the embeddings, in a short loop over slices of each device's rows (two halves when
           B_local is even), and build the local (B_local, B_global) logits block one slice of columns at
           a time. A custom VJP recomputes the logits backward and gathers the rows with their lse and
           cotangent for the columns' gradient, as 'tiled' does, so nothing is reduce-scattered.
  'tiled': never gathers. Column chunks travel around a ring of devices (ppermute) and are cut into tiles
           of `tile_size` columns; an online log-sum-exp keeps O(B_local x tile) memory. A custom VJP
           recomputes each tile in the backward pass, where the rows travel the ring as well, with their
           log-sum-exp and cotangent, so every gradient lands on the device that owns the embedding and
           nothing is reduce-scattered.
Both give the global loss exactly: sum over devices of the local row losses, divided by the global batch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jclip_jax.data import batch as batch_schema
from jclip_jax.models.layers import l2_normalize

TEXT_PAIR_TEMPERATURE = 0.05  # paper §4.2, after Günther et al. (2023)
MAX_LOGIT_SCALE = math.log(100.0)  # open_clip clamps log(1/tau) to [0, ln 100] after every step

# Stage -> the tasks whose InfoNCE losses are summed (eq. 3). The paper's eq. 3 writes L3 as
# L_nce(B_text3) + L_nce+(B_img;l), but its text (and the data it describes) put the hard negatives on the
# text triplets: L3 = L_nce+(triplets) + L_nce(image-text), which is what we implement.
STAGE_TASKS = {
    1: ("text_pair", "image_text"),
    2: ("text_pair", "image_text"),
    3: ("text_triplet", "image_text"),
}
TASKS = ("text_pair", "image_text", "text_triplet")
IMPLEMENTATIONS = ("plain", "tiled")
# loss.precision: the logits matmuls' precision (jax.lax.Precision). 'highest' is true float32 on every
# backend. At a backend's default, a float32 matmul runs as ONE bf16 pass on TPU (logits off by ~1e-3 x
# scale, 0.2 at scale 100); 'high' is three bf16 passes (float32-like at a third of 'highest's cost). The
# logits are a few % of a step's FLOPs at jina-clip's sizes, so the default is 'highest'.
PRECISIONS = ("default", "high", "highest")
DEFAULT_PRECISION = "highest"


def image_text_scale(logit_scale: jax.Array) -> jax.Array:
    """The learnable image-text scale 1/tau = exp(logit_scale), logit_scale clamped to <= ln 100.

    The trainer also clamps the stored parameter after each update (open_clip does the same); the clamp
    here only guards values loaded from elsewhere. Below the cap the gradient is untouched.
    """
    return jnp.exp(jnp.minimum(logit_scale.astype(jnp.float32), MAX_LOGIT_SCALE))


# ------------------------------------------------------------------------------------------------------
# Single device, full matrix: the definitions.


def infonce(q: jax.Array, p: jax.Array, scale: jax.Array | float) -> jax.Array:
    """L_nce (eq. 1): mean_i -log softmax_j(s q_i.p_j)[i]  +  mean_i -log softmax_j(s p_i.q_j)[i].

    q, p: (B, D) float32, L2-normalised. Returns a float32 scalar.
    """
    logits = scale * (q @ p.T)  # (B, B); row i: query i against every passage
    positives = jnp.diagonal(logits)
    q_to_p = jnp.mean(jax.nn.logsumexp(logits, axis=1) - positives)
    p_to_q = jnp.mean(jax.nn.logsumexp(logits, axis=0) - positives)
    return q_to_p + p_to_q


def infonce_hard_negatives(q: jax.Array, p: jax.Array, negatives: jax.Array,
                           scale: jax.Array | float) -> jax.Array:
    """L_nce+ (eq. 2): query -> (every positive and every hard negative in the batch), + passage -> queries.

    q, p: (B, D); negatives: (B, K, D); all float32, L2-normalised. Returns a float32 scalar.
    """
    b, k, d = negatives.shape
    candidates = jnp.concatenate([p, negatives.reshape(b * k, d)], axis=0)  # (B + B*K, D)
    q_logits = scale * (q @ candidates.T)  # (B, B + B*K); the positive of row i is column i
    positives = scale * jnp.sum(q * p, axis=-1)
    q_to_candidates = jnp.mean(jax.nn.logsumexp(q_logits, axis=1) - positives)
    p_to_q = jnp.mean(jax.nn.logsumexp(scale * (p @ q.T), axis=1) - positives)
    return q_to_candidates + p_to_q


# ------------------------------------------------------------------------------------------------------
# Local rows against all columns, inside shard_map. `axes` is the tuple of mesh axes the batch is split
# over (empty: one device); every function returns per-row log-sum-exps of the local rows.


def _tiles(x: jax.Array, tile: int) -> jax.Array:
    """(m, ...) -> (m // tile, tile, ...)."""
    return x.reshape(x.shape[0] // tile, tile, *x.shape[1:])


def _ring_step(x, axes, ring_size):
    """Send this device's chunk to the next device on the ring over `axes` (linearised device index)."""
    return jax.lax.ppermute(x, axes, perm=[(i, (i + 1) % ring_size) for i in range(ring_size)])


def _gather_pieces(n: int) -> int:
    """How many pieces the plain form all-gathers a device's n rows in: the smallest divisor of n above 1."""
    return next((k for k in range(2, n + 1) if n % k == 0), 1)


def _chunks(x, axes, ring_size, gather, body, init):
    """Fold `body(chunk, acc)` over every device's chunk of the pytree x (this device's included).

    gather=True (the plain form): a loop over `_gather_pieces` slices of the local rows; each step
    all-gathers one slice from every device (a chunk of 1/pieces of the global rows). The gather lives inside
    the loop body, so XLA can neither keep a whole gathered matrix alive across phases nor merge (CSE) one
    phase's gather or logits with another's, which would leave several gathered matrices and logits blocks
    alive at once (XLA's CPU pipeline drops the optimization barriers). gather=False (the tiled form): the
    chunks travel a ring, one ppermute per step, so at most one foreign chunk is alive at a time.
    """
    if not axes:
        return body(x, init)
    if gather:
        n = jax.tree.leaves(x)[0].shape[0]
        pieces = _gather_pieces(n)
        size = n // pieces

        def gather_step(k, acc):
            piece = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, k * size, size), x)
            return body(jax.tree.map(lambda a: jax.lax.all_gather(a, axes, tiled=True), piece), acc)

        return jax.lax.fori_loop(0, pieces, gather_step, init)

    def step(_, carry):
        chunk, acc = carry
        chunk = jax.tree.map(lambda a: _ring_step(a, axes, ring_size), chunk)
        return chunk, body(chunk, acc)

    return jax.lax.fori_loop(1, ring_size, step, (x, body(x, init)))[1]


def _matmul_t(a, b, precision):
    """a @ b.T at the loss's precision: (n, D) x (m, D) -> (n, m) float32."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def _matmul(a, b, precision):
    """a @ b at the loss's precision: (n, k) x (k, D) -> (n, D) float32."""
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _blockwise_logsumexp(rows, cols, scale, axes, ring_size, tile, gather, precision):
    """(n, D) local rows x (m, D) local columns -> (n,) lse_j over all global columns of s rows_i.cols_j.

    Memory: one (n, tile) logits tile at a time (tile=None: a whole chunk). The backward pass recomputes
    the logits instead of saving them.
    """
    return _blockwise_logsumexp_fwd(rows, cols, scale, axes, ring_size, tile, gather, precision)[0]


def _blockwise_logsumexp_fwd(rows, cols, scale, axes, ring_size, tile, gather, precision):
    def add_chunk(chunk, running):
        def add_tile(running, col_tile):  # online log-sum-exp: running max m, running sum s of exp(x - m)
            m, s = running
            logits = _matmul_t(scaled_rows, col_tile, precision)  # (n, tile)
            m_new = jnp.maximum(m, jnp.max(logits, axis=1))
            s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[:, None]), axis=1)
            return (m_new, s), None

        return jax.lax.scan(add_tile, running, _tiles(chunk, tile or chunk.shape[0]))[0]

    n = rows.shape[0]
    scaled_rows = scale * rows  # scaling the (n, D) rows, not each (n, tile) logits tile
    running = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32))
    if axes:  # the -inf/0 constants are the same everywhere; the running values will differ per device
        running = jax.tree.map(lambda x: jax.lax.pcast(x, axes, to="varying"), running)
    m, s = _chunks(cols, axes, ring_size, gather, add_chunk, running)
    lse = m + jnp.log(s)
    return lse, (rows, cols, scale, lse)


def _blockwise_logsumexp_bwd(axes, ring_size, tile, gather, precision, residuals, g):
    """g (n,) = dLoss/dlse. With P_ij = exp(s r_i.c_j - lse_i):
    d r_i = s sum_j g_i P_ij c_j     (columns visit this device, as in the forward pass)
    d c_j = s sum_i g_i P_ij r_i     (rows visit this device with their lse and g, so the gradient of a
                                      column is computed where the column lives: no reduce-scatter)
    d s   = sum_ij g_i P_ij r_i.c_j  (this device's rows; the caller's pcast sums it over devices)
    """
    # The barriers order the work so only one logits block is alive at a time: the backward pass starts
    # after the forward pass (and XLA cannot CSE its recomputed logits with the forward ones, keeping
    # them alive in between), and the columns' phase starts after the rows' phase.
    rows, cols, scale, lse, g = jax.lax.optimization_barrier(residuals + (g,))

    scaled_rows, scaled_cols = scale * rows, scale * cols

    def rows_grad(col_chunk, acc):  # local rows against one chunk of columns
        def add_tile(acc, col_tile):
            weights = g[:, None] * jnp.exp(_matmul_t(scaled_rows, col_tile, precision) - lse[:, None])  # (n, tile)
            return acc + _matmul(weights, col_tile, precision), None

        return jax.lax.scan(add_tile, acc, _tiles(col_chunk, tile or col_chunk.shape[0]))[0]

    def cols_grad(row_chunk, d_cols):  # one chunk of rows (with their lse and g) against the local columns
        def add_tile(d_cols, row_tile):
            r, r_lse, r_g = row_tile
            weights = r_g[:, None] * jnp.exp(_matmul_t(r, scaled_cols, precision) - r_lse[:, None])  # (tile, m)
            return d_cols + scale * _matmul(weights.T, r, precision), None

        tiles = jax.tree.map(lambda x: _tiles(x, tile or row_chunk[0].shape[0]), row_chunk)
        return jax.lax.scan(add_tile, d_cols, tiles)[0]

    # weighted_cols_i = sum_j g_i P_ij c_j
    weighted_cols = _chunks(cols, axes, ring_size, gather, rows_grad, jnp.zeros_like(rows))
    rows, cols, lse, g, weighted_cols = jax.lax.optimization_barrier((rows, cols, lse, g, weighted_cols))
    d_cols = _chunks((rows, lse, g), axes, ring_size, gather, cols_grad, jnp.zeros_like(cols))
    # d s = sum_i r_i . (sum_j g_i P_ij c_j): no (n, tile) product of weights and logits needs keeping.
    return scale * weighted_cols, d_cols, jnp.sum(rows * weighted_cols)


_blockwise_logsumexp.defvjp(_blockwise_logsumexp_fwd, _blockwise_logsumexp_bwd)


def _local_rows_infonce(q, p, negatives, scale, *, axes, ring_size, implementation, tile_size, precision):
    """Sum over this device's rows of both directions' -log softmax[positive]; see the module docstring.

    q, p: (n, D); negatives: (n, K, D) or None; scale: (). Returns the (unnormalised) local sum.
    """
    candidates = p if negatives is None else jnp.concatenate([p, negatives.reshape(-1, p.shape[-1])])
    if implementation == "tiled" and tile_size is not None:
        for what, size in (("local batch", q.shape[0]), ("local candidates", candidates.shape[0])):
            if size % tile_size:
                raise ValueError(f"loss.tile_size={tile_size} must divide the {what} per device ({size})")
    tile, gather = (None, True) if implementation == "plain" else (tile_size, False)
    if axes:  # scale is replicated; this cast makes its backward sum the per-device contributions
        scale = jax.lax.pcast(scale, axes, to="varying")
    lse_q = _blockwise_logsumexp(q, candidates, scale, axes, ring_size, tile, gather, precision)  # q -> all candidates
    # One direction at a time (forward, and in reverse order backward): one logits block alive at once.
    q, p, lse_q = jax.lax.optimization_barrier((q, p, lse_q))
    lse_p = _blockwise_logsumexp(p, q, scale, axes, ring_size, tile, gather, precision)  # p -> all queries
    positives = scale * jnp.sum(q * p, axis=-1)
    return jnp.sum(lse_q - positives) + jnp.sum(lse_p - positives)


def sharded_infonce(q: jax.Array, p: jax.Array, scale: jax.Array | float, negatives: jax.Array | None = None,
                    *, mesh: jax.sharding.Mesh | None, batch_axes: Sequence[str] = (),
                    implementation: str = "plain", tile_size: int | None = None,
                    precision: str = DEFAULT_PRECISION) -> jax.Array:
    """L_nce (negatives=None) or L_nce+ of the global batch, with the batch split over `batch_axes`.

    q, p: (B, D); negatives: (B, K, D) or None; float32, L2-normalised; scale: (). The rows are resharded
    to P(batch_axes) (other mesh axes hold replicas). Equals `infonce` / `infonce_hard_negatives` on the
    whole batch. `tile_size` (tiled only): columns per tile; None = one tile per device chunk.
    `precision`: of the logits matmuls, one of PRECISIONS (see there).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"loss.implementation={implementation!r}; expected one of {IMPLEMENTATIONS}")
    if precision not in PRECISIONS:
        raise ValueError(f"loss.precision={precision!r}; expected one of {PRECISIONS}")
    axes = tuple(batch_axes)
    global_batch = q.shape[0]
    scale = jnp.asarray(scale, jnp.float32)
    local = functools.partial(_local_rows_infonce, implementation=implementation, tile_size=tile_size,
                              precision=jax.lax.Precision(precision))
    if not axes:  # one device (or the batch replicated): no collectives
        return local(q, p, negatives, scale, axes=(), ring_size=1) / global_batch
    if mesh is None:
        raise ValueError(f"batch_axes={axes} needs a mesh")
    missing = [a for a in axes if a not in mesh.axis_names]
    if missing:
        raise ValueError(f"loss batch axes {missing} are not mesh axes {mesh.axis_names}")
    ring_size = math.prod(mesh.shape[a] for a in axes)
    if global_batch % ring_size:
        raise ValueError(f"global batch {global_batch} is not divisible by the {ring_size} devices of {axes}")

    def per_device(q, p, negatives, scale):
        local_sum = local(q, p, negatives, scale, axes=axes, ring_size=ring_size)
        return jax.lax.psum(local_sum, axes) / global_batch

    rows = P(axes)
    specs = (rows, rows, None if negatives is None else rows, P())
    return jax.shard_map(per_device, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=True)(
        q, p, negatives, scale)


# ------------------------------------------------------------------------------------------------------
# Tasks, Matryoshka and the stage's joint loss.


def matryoshka_infonce(q, p, scale, negatives=None, *, dims: Sequence[int] = (),
                       weights: Sequence[float] = (), **sharding) -> jax.Array:
    """Sum over prefixes d of weight_d * L(q[:, :d], p[:, :d], ...), each prefix re-normalised.

    q, p: (B, D), negatives (B, K, D) or None: raw (unnormalised) features. dims=() means the full
    embedding with weight 1 (plain jina-clip-v1). `sharding` goes to `sharded_infonce`.
    """
    full = q.shape[-1]
    dims = tuple(dims) or (full,)
    weights = tuple(weights) or (1.0,) * len(dims)
    if len(weights) != len(dims):
        raise ValueError(f"loss.matryoshka_weights {weights} and loss.matryoshka_dims {dims} differ in "
                         "length")
    if any(not 0 < d <= full for d in dims):
        raise ValueError(f"loss.matryoshka_dims {dims} must lie in 1..{full} (the embedding size)")
    total = jnp.zeros((), jnp.float32)
    for d, w in zip(dims, weights, strict=True):
        negs = None if negatives is None else l2_normalize(negatives[..., :d])
        total += w * sharded_infonce(l2_normalize(q[:, :d]), l2_normalize(p[:, :d]), scale, negs, **sharding)
    return total


def check_loss_config(loss_config) -> tuple[str, ...]:
    """Validate `config.loss` early; return its tasks. Fields: stage (1/2/3) or tasks, implementation,
    tile_size, precision, text_temperature, matryoshka_dims, matryoshka_weights, batch_axes."""
    tasks = tuple(loss_config.get("tasks", None) or ())
    if not tasks:
        stage = loss_config.get("stage", None)
        if stage not in STAGE_TASKS:
            raise ValueError(f"loss.stage={stage!r}; expected one of {sorted(STAGE_TASKS)} "
                             "(or set loss.tasks)")
        tasks = STAGE_TASKS[stage]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"loss.tasks has unknown {unknown}; known: {TASKS}")
    impl = loss_config.get("implementation", "plain")
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"loss.implementation={impl!r}; expected one of {IMPLEMENTATIONS}")
    precision = loss_config.get("precision", DEFAULT_PRECISION)
    if precision not in PRECISIONS:
        raise ValueError(f"loss.precision={precision!r}; expected one of {PRECISIONS}")
    tile = loss_config.get("tile_size", None)
    if tile is not None and (not isinstance(tile, int) or tile <= 0):
        raise ValueError(f"loss.tile_size={tile!r} must be a positive int or None")
    return tasks


def joint_loss(features: dict[str, jax.Array], logit_scale: jax.Array, loss_config, *,
               mesh=None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The stage's joint loss (eq. 3): the sum of its tasks' InfoNCE losses, and each one on its own.

    features (raw float32 outputs of the towers, not normalised), per task:
      text_pair:    'text_query' (B, D), 'text_passage' (B, D)          tau = loss.text_temperature (0.05)
      image_text:   'image_caption' (B, D), 'image' (B, D)              tau = 1 / exp(logit_scale)
      text_triplet: 'triplet_query' (B, D), 'triplet_positive' (B, D),
                    'triplet_negatives' (B, K, D)                       tau = loss.text_temperature
    The tasks are those whose keys `features` holds (the step checked the batch against config.loss, which
    the config's validation checked once). Returns (total, {'loss/<task>': value, 'logit_scale':
    exp(logit_scale)}).
    """
    tasks = batch_schema.tasks_of(features)
    kwargs = dict(mesh=mesh, batch_axes=tuple(loss_config.get("batch_axes", ()) or ()),
                  implementation=loss_config.get("implementation", "plain"),
                  tile_size=loss_config.get("tile_size", None),
                  precision=loss_config.get("precision", DEFAULT_PRECISION),
                  dims=tuple(loss_config.get("matryoshka_dims", ()) or ()),
                  weights=tuple(loss_config.get("matryoshka_weights", ()) or ()))
    text_scale = 1.0 / loss_config.get("text_temperature", TEXT_PAIR_TEMPERATURE)
    image_scale = image_text_scale(logit_scale)
    f32 = {k: v.astype(jnp.float32) for k, v in features.items()}  # bf16 towers, fp32 loss
    losses = {}
    if "text_pair" in tasks:
        losses["text_pair"] = matryoshka_infonce(f32["text_query"], f32["text_passage"], text_scale, **kwargs)
    if "image_text" in tasks:
        losses["image_text"] = matryoshka_infonce(f32["image_caption"], f32["image"], image_scale, **kwargs)
    if "text_triplet" in tasks:
        losses["text_triplet"] = matryoshka_infonce(f32["triplet_query"], f32["triplet_positive"], text_scale,
                                                    f32["triplet_negatives"], **kwargs)
    metrics = {f"loss/{k}": v for k, v in losses.items()}
    metrics["logit_scale"] = image_scale
    return sum(losses.values()), metrics
