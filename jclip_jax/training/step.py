"""The multi-task contrastive training step: sharded init, GradCache, the jitted update.

training/setup.py builds it for a config (jclip-train, jclip-compile and bench/ all go through there):

    graphdef, state, shardings = create_train_state(lambda: JinaCLIP(model_cfg, rngs=nnx.Rngs(0)), tx, mesh)
    step = make_train_step(graphdef, tx, config.loss, mesh, shardings, micro_batches=4)
    state, metrics = step(state, batch, rng)   # state is donated

Train state (a dict, checkpointable as is): {'params': nnx.State of the model's nnx.Param variables
(float32 master weights), 'opt_state': optax state, 'step': int32 ()}.

Batch: a dict of global arrays with the keys of config.loss's tasks, as data/batch.py defines them
(image, image_caption; text_query, text_passage; triplet_query, triplet_positive, triplet_negatives).
Text keys of equal shape go through the text tower as one batch (see `features`); the features dict has
the same keys as the batch (see losses.joint_loss).

GradCache (micro_batches = k > 1) gives the same update as the whole batch at once, with the activation
memory of one micro-batch: (1) embed every micro-batch without gradients, (2) take the loss over the
whole batch and its gradient w.r.t. the embeddings (and logit_scale), (3) replay each micro-batch's
forward pass and pull its slice of that gradient back to the parameters with a VJP. Cost: one extra
forward pass. Dropout masks are keyed on (rng, key, micro-batch index), so both passes see the same mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jclip_jax import sharding
from jclip_jax.data import batch as batch_schema
from jclip_jax.data.batch import IMAGE_KEYS, TEXT_KEYS
from jclip_jax.models.layers import activation_sharding
from jclip_jax.training import losses

# ----------------------------------------------------------------------------------------- state


def abstract_train_state(make_model: Callable[[], nnx.Module], tx: optax.GradientTransformation, mesh,
                         rules=sharding.DEFAULT_RULES):
    """The train state's shapes and shardings, without running anything (also for compile-only devices).

    Returns (graphdef, init, abstract_state, state_shardings): `init()` builds the state; the abstract
    state's leaves are ShapeDtypeStructs carrying their NamedShardings.
    """
    abstract_model = nnx.eval_shape(make_model)
    graphdef, abstract_params, rest = nnx.split(abstract_model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError("the model has non-Param state; this train step only carries nnx.Param variables")

    def init():
        params = nnx.state(make_model(), nnx.Param)
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    shapes = jax.eval_shape(init)
    shardings = sharding.state_shardings(shapes, mesh, rules)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
    return graphdef, init, abstract, shardings


def create_train_state(make_model: Callable[[], nnx.Module], tx: optax.GradientTransformation, mesh,
                       rules=sharding.DEFAULT_RULES):
    """Build params and optimizer state directly in their shardings (nothing is materialised replicated).

    Returns (graphdef, state, state_shardings); shardings come from the params' logical axis names.
    """
    graphdef, init, _, shardings = abstract_train_state(make_model, tx, mesh, rules)
    state = jax.jit(init, out_shardings=shardings)()
    return graphdef, state, shardings


# -------------------------------------------------------------------------------------- features


def features(graphdef, params, batch: dict, rng: jax.Array | None) -> dict[str, jax.Array]:
    """Tower outputs for every key of `batch`: float32 (B, D) (negatives: (B, K, D)), not normalised.

    Text keys with the same (rows, length) go through the text tower as ONE batch (one larger matmul per
    weight, and one weight gradient instead of one per key): stacked per row as (B, keys, L) -> (B*keys, L),
    so each device's rows stay on that device, then split back. Every row is computed on its own (padding
    masks, mean pooling), so this is the same maths as one call per key.
    rng=None: deterministic (no dropout); else each tower call gets its own fold of rng (dropout masks are
    independent per row either way).
    """
    model = nnx.merge(graphdef, params)
    out = {}
    groups: dict[tuple[int, int], list[str]] = {}
    for key in sorted(batch):
        if key not in TEXT_KEYS + IMAGE_KEYS:
            raise ValueError(f"unknown batch key {key!r}; known: {TEXT_KEYS + IMAGE_KEYS}")
        x = batch[key]
        if key in IMAGE_KEYS:
            out[key] = model.image_features(x, rng=None if rng is None else jax.random.fold_in(rng, _key_index(key)))
        else:
            groups.setdefault((x.shape[0], x.shape[-1]), []).append(key)
    for (rows, length), keys in groups.items():
        parts = [batch[k].reshape(rows, -1, length) for k in keys]  # negatives (B, K, L); others (B, 1, L)
        stacked = jnp.concatenate(parts, axis=1)  # (B, N, L)
        key_rng = None if rng is None else jax.random.fold_in(rng, _key_index(keys[0]))
        embedded = model.text_features(stacked.reshape(-1, length), rng=key_rng).reshape(rows, stacked.shape[1], -1)
        start = 0
        for k, part in zip(keys, parts, strict=True):
            e = embedded[:, start:start + part.shape[1]]
            out[k] = e if k == "triplet_negatives" else e[:, 0]
            start += part.shape[1]
    return out


def _key_index(key: str) -> int:
    return (TEXT_KEYS + IMAGE_KEYS).index(key)


def check_batch(batch: dict, tasks, micro_batches: int, batch_devices: int) -> None:
    """Fail early, naming the key, on missing keys or batch sizes the step cannot split."""
    wanted = set(batch_schema.keys(tasks))
    if set(batch) != wanted:
        raise ValueError(f"batch keys {sorted(batch)} do not match the tasks {tasks}: "
                         f"expected {sorted(wanted)}")
    for key, x in batch.items():
        if x.shape[0] % (micro_batches * batch_devices):
            raise ValueError(f"batch[{key!r}] has {x.shape[0]} rows: not divisible by micro_batches="
                             f"{micro_batches} x {batch_devices} batch devices")


# -------------------------------------------------------------------------------------- gradients


def _split_micro(x: jax.Array, k: int, rows: NamedSharding | None) -> jax.Array:
    """(B, ...) -> (k, B/k, ...), micro-batch j = rows j, j+k, j+2k, ...

    Strided, so a device's contiguous rows hold B/(k * devices) rows of every micro-batch: each micro-batch
    is spread over all devices and the split moves no data.
    """
    x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
    if rows is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(rows.mesh, P(None, *rows.spec)))


def _merge_micro(x: jax.Array) -> jax.Array:
    """Inverse of _split_micro: (k, B/k, ...) -> (B, ...)."""
    return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def grad_cache(embed_fn: Callable, loss_fn: Callable, params, batch: dict, micro_batches: int,
               rows: NamedSharding | None = None):
    """Exact gradient of loss_fn(params, embed_fn(params, batch)) with one micro-batch's activations.

    embed_fn(params, micro_batch, index) -> dict of embeddings, each with the micro-batch as leading axis;
      it must be a pure function of its arguments (key dropout on `index`) since it runs twice.
    loss_fn(params, embeddings) -> (loss, aux); it may use params directly (e.g. logit_scale).
    batch: dict of (B, ...) arrays; B divisible by micro_batches. rows: the batch's row sharding.
    Returns ((loss, aux), grads) like jax.value_and_grad(..., has_aux=True).
    """
    k = micro_batches
    micro = {key: _split_micro(x, k, rows) for key, x in batch.items()}
    indices = jnp.arange(k)

    # (1) Embeddings of every micro-batch, no gradient bookkeeping.
    embeddings = jax.lax.map(lambda xs: embed_fn(params, xs[0], xs[1]), (micro, indices))
    embeddings = {key: _merge_micro(e) for key, e in embeddings.items()}

    # (2) The whole batch's loss; its gradient w.r.t. the embeddings and the params it uses directly.
    (loss, aux), (grads, embedding_grads) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        params, embeddings)
    embedding_grads = {key: _split_micro(g, k, rows) for key, g in embedding_grads.items()}

    # (3) Replay each micro-batch and pull its slice of dLoss/dEmbeddings back to the params.
    def replay(grads, xs):
        micro_batch, cotangent, index = xs
        _, pullback = jax.vjp(lambda p: embed_fn(p, micro_batch, index), params)
        return jax.tree.map(jnp.add, grads, pullback(cotangent)[0]), None

    grads, _ = jax.lax.scan(replay, grads, (micro, embedding_grads, indices))
    return (loss, aux), grads


# ------------------------------------------------------------------------------------------- step


def skip_if_nonfinite(loss, grad_norm, params, opt_state, state):
    """Keep the old params and optimizer state when the loss, the gradient norm or the new params are not
    finite: a NaN never reaches the state (nor a checkpoint). Returns (params, opt_state, int32 0/1 skipped).

    optax.apply_if_finite does this for the updates alone, but changes the optimizer state's layout (and so
    every checkpoint's) and does not see a NaN loss with finite gradients; hence this select.
    """
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(params))
    keep = lambda new, old: jnp.where(finite, new, old)
    return (jax.tree.map(keep, params, state["params"]), jax.tree.map(keep, opt_state, state["opt_state"]),
            (~finite).astype(jnp.int32))


def make_train_step(graphdef, tx: optax.GradientTransformation, loss_config, mesh, state_shardings, *,
                    tasks: tuple[str, ...] | None = None, micro_batches: int = 1, dropout: bool = True,
                    schedule: optax.Schedule | None = None, rules=sharding.DEFAULT_RULES,
                    activation_constraints: bool = True, jit: bool = True):
    """The update step `(state, batch, rng) -> (state, metrics)`, jitted with the state donated.

    loss_config: losses.joint_loss's config (stage or tasks, implementation, tile_size, text_temperature,
    matryoshka_*); its batch_axes default to the mesh's batch axes. tasks: config.loss's tasks as the config's
    validation returned them (None: checked here). micro_batches > 1 uses GradCache. activation_constraints:
    pin the towers' activations to the batch axes (layers.activation_sharding).
    metrics: 'loss', 'loss/<task>', 'logit_scale' (exp'd), 'grad_norm', 'nonfinite' (1: this update was
    skipped, see skip_if_nonfinite), and 'lr' if a schedule is given.
    """
    tasks = tuple(tasks) if tasks is not None else losses.check_loss_config(loss_config)
    if not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"micro_batches={micro_batches!r} must be a positive int")
    loss_config = dict(loss_config)  # a private copy: the batch axes default to the mesh's
    batch_axes = tuple(loss_config.get("batch_axes", None) or sharding.batch_axes(mesh, rules))
    loss_config["batch_axes"] = batch_axes
    batch_devices = math.prod(mesh.shape[a] for a in batch_axes)
    batch_sharding = NamedSharding(mesh, P(batch_axes))

    def embed_fn(params, batch, index, rng):
        return features(graphdef, params, batch, None if rng is None else jax.random.fold_in(rng, index))

    def loss_fn(params, embeddings):
        return losses.joint_loss(embeddings, params["logit_scale"][...], loss_config, mesh=mesh)

    def gradients(params, batch, rng):
        if micro_batches == 1:
            def full_loss(params):
                return loss_fn(params, embed_fn(params, batch, 0, rng))

            return jax.value_and_grad(full_loss, has_aux=True)(params)

        def micro_embed_fn(params, micro_batch, index):
            return embed_fn(params, micro_batch, index, rng)

        return grad_cache(micro_embed_fn, loss_fn, params, batch, micro_batches, batch_sharding)

    def step(state, batch, rng):
        check_batch(batch, tasks, micro_batches, batch_devices)
        rng = rng if dropout else None
        params = state["params"]
        with activation_sharding(mesh, rules, activation_constraints):  # activations: rows over the batch axes
            (loss, metrics), grads = gradients(params, batch, rng)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        params = optax.apply_updates(params, updates)
        # open_clip clamps log(1/tau) to [0, ln 100] after every update.
        params["logit_scale"][...] = jnp.clip(params["logit_scale"][...], 0.0, losses.MAX_LOGIT_SCALE)
        grad_norm = optax.tree.norm(grads)
        params, opt_state, nonfinite = skip_if_nonfinite(loss, grad_norm, params, opt_state, state)
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, nonfinite=nonfinite)
        if schedule is not None:
            metrics["lr"] = schedule(state["step"])
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    if not jit:
        return step
    replicated = NamedSharding(mesh, P())
    return jax.jit(step, in_shardings=(state_shardings, batch_sharding, replicated),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)
