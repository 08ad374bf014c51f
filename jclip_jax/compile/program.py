"""The trainer's step for a config, lowered and compiled for any devices (abstract TPU ones included).

Nothing executes: the train state is built with `eval_shape` and the batch is a dict of ShapeDtypeStructs,
each carrying the sharding the trainer gives it. The step is `train_step.make_train_step` called with the
same arguments `jclip-train` uses (config.loss, config.micro_batches, the run's optimizer and schedule,
the config's mesh and the default sharding rules), so what compiles here is what a pod would run.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jclip_jax import losses, optim, sharding, train_config, train_step
from jclip_jax.compile import topology
from jclip_jax.models.clip import JinaCLIP

NEGATIVES_PER_QUERY = 7  # triplets (stage 3): the pipeline's (B, 7, L) negatives


@dataclasses.dataclass
class CompiledStep:
    """A compiled step, or the compiler's refusal (`error`, e.g. RESOURCE_EXHAUSTED when it exceeds HBM)."""

    config: object
    mesh: jax.sharding.Mesh
    tasks: tuple[str, ...]
    abstract_state: dict
    state_shardings: dict
    batch: dict[str, jax.ShapeDtypeStruct]
    lowered: object
    compiled: object | None
    error: str | None
    lower_seconds: float
    compile_seconds: float


def batch_shapes(config, tasks, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The step's global batch (train.step_batch's keys) as ShapeDtypeStructs sharded like the trainer's.

    image float32 (B_img, S, S, 3); image_caption int32 (B_img, L_img); text_* int32 (B_txt, L_txt);
    triplet_negatives int32 (B_txt, 7, L_txt).
    """
    d, size = config.data, config.model.vision.image_size
    rows = NamedSharding(mesh, P(sharding.batch_axes(mesh)))
    shapes = {}
    if "image_text" in tasks:
        shapes["image"] = ((d.image_batch_size, size, size, 3), jnp.float32)
        shapes["image_caption"] = ((d.image_batch_size, d.image_max_length), jnp.int32)
    for task, keys in (("text_pair", ("text_query", "text_passage")),
                       ("text_triplet", ("triplet_query", "triplet_positive"))):
        if task in tasks:
            shapes.update({k: ((d.text_batch_size, d.text_max_length), jnp.int32) for k in keys})
    if "text_triplet" in tasks:
        shapes["triplet_negatives"] = ((d.text_batch_size, NEGATIVES_PER_QUERY, d.text_max_length), jnp.int32)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=rows) for k, (shape, dtype) in shapes.items()}


def compile_train_step(config, devices, num_slices: int = 1, *, compile: bool = True) -> CompiledStep:
    """Lower and compile the step `jclip-train` would run for `config` on `devices` (abstract or real).

    The config is validated first (a bad field fails before any tracing).
    """
    if config.data.synthetic_dir:  # the demo: data paths default to its splits (nothing is read)
        from jclip_jax.train import with_synthetic_paths

        config = with_synthetic_paths(config)
    train_config.validate(config)
    tasks = losses.check_loss_config(config.loss)
    mesh = topology.make_mesh(config.mesh, devices, num_slices)
    run_optim = train_config.optim_for_run(config)
    tx, schedule = optim.make_optimizer(run_optim), optim.learning_rate_schedule(run_optim)
    graphdef, _, abstract_state, shardings = train_step.abstract_train_state(
        lambda: JinaCLIP(config.model, rngs=nnx.Rngs(config.seed)), tx, mesh)
    sharding.check_replicated_fraction(shardings["params"], abstract_state["params"], mesh,
                                       config.get("max_replicated_fraction", None))
    step_fn = train_step.make_train_step(graphdef, tx, config.loss, mesh, shardings,
                                         micro_batches=config.micro_batches, schedule=schedule)
    batch = batch_shapes(config, tasks, mesh)
    rng = jax.eval_shape(lambda: jax.random.key(0))
    rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=NamedSharding(mesh, P()))

    t0 = time.perf_counter()
    lowered = step_fn.lower(abstract_state, batch, rng)
    t1 = time.perf_counter()
    compiled = error = None
    if compile:
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:  # the compiler's own refusal, e.g. over HBM
            error = str(e)
    return CompiledStep(config, mesh, tasks, abstract_state, shardings, batch, lowered, compiled, error,
                        t1 - t0, time.perf_counter() - t1)
