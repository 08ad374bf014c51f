"""Everything before the first training step, in one function that jclip-train, jclip-compile and bench/ all
call, so the program jclip-compile compiles is the one jclip-train runs, by construction (MaxText's
setup_train_loop, shared by its train.py and train_compile.py).

    run = setup(config, workdir)                 # jclip-train: this process's devices, its inputs checked
    run = setup(config, devices=tpu_devices)     # jclip-compile: abstract devices; nothing is read
    state = run.init_state()                     # params and optimizer state, built in their shardings
    state, metrics = run.step(state, batch, rng) # batch: run.batch_spec's keys, shapes and shardings

The order: the config's validation (training/config.py: the fields; with a workdir also distributed
initialisation, the demo's data, the input paths and manifests) -> mesh -> batch split -> optimizer and
schedule -> abstract train state and its shardings -> replication check -> the jitted step.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jclip_jax import distributed, sharding
from jclip_jax.data import batch as batch_schema
from jclip_jax.data.pipeline import DataConfig
from jclip_jax.models.clip import JinaCLIP
from jclip_jax.training import config as config_lib
from jclip_jax.training import flops, optim
from jclip_jax.training import step as train_step


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """What the training loop and the compiler need, derived once from a config."""

    config: ml_collections.ConfigDict  # validated, synthetic-data paths filled in
    tasks: tuple[str, ...]  # config.loss's tasks
    data: DataConfig  # the pipeline's config
    eval_tasks: dict  # config.evals.tasks, checked
    mesh: jax.sharding.Mesh
    optim: ml_collections.ConfigDict  # the run's optimizer config
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    graphdef: nnx.GraphDef
    abstract_state: dict  # the train state as ShapeDtypeStructs carrying their NamedShardings
    shardings: dict  # the train state's NamedShardings
    step: Callable  # jitted (state, batch, rng) -> (state, metrics); the state is donated
    batch_spec: dict[str, jax.ShapeDtypeStruct]  # the step's global batch (data/batch.py), sharded
    rng_spec: jax.ShapeDtypeStruct  # the step's dropout key, replicated
    init: Callable[[], dict]  # builds the train state (unsharded); init_state() shards it

    @property
    def batch_axes(self) -> tuple[str, ...]:
        return sharding.batch_axes(self.mesh)

    @property
    def pairs_per_step(self) -> int:
        """Training examples per step: image-caption pairs plus text pairs or triplets."""
        return self.data.image_batch_size + self.data.text_batch_size

    def model_flops(self) -> float:
        """Analytic model FLOPs of one step (training/flops.py), for MFU."""
        negatives = batch_schema.NEGATIVES_PER_QUERY if "text_triplet" in self.tasks else 0
        return flops.train_step_flops(self.config.model, self.data.image_batch_size, self.data.text_batch_size,
                                      self.data.text_max_length, negatives_per_query=negatives,
                                      caption_len=self.data.image_max_length)

    def init_state(self) -> dict:
        """A fresh train state, each array created directly in its sharding (nothing is replicated first)."""
        return jax.jit(self.init, out_shardings=self.shardings)()

    def lower(self) -> jax.stages.Lowered:
        """The step lowered for the abstract state and batch (jclip-compile compiles this)."""
        return self.step.lower(self.abstract_state, self.batch_spec, self.rng_spec)


def setup(config, workdir: str | None = None, *, devices=None, num_slices: int | None = None) -> TrainSetup:
    """The training run of `config`, up to its first step.

    workdir given (jclip-train): initialises the distributed runtime, writes the demo's synthetic data if
    absent and checks every input the run will read, before any compute. devices: the mesh's devices
    (default: all of jax's), e.g. a TPU topology's abstract devices, or a function returning them (called
    after validation: loading libtpu for a topology is not where a bad config should be reported);
    num_slices: how many slices they span.
    """
    if config.get("local_smoke_run"):  # the first line of a runlocal run (training/config.runlocal)
        print(config.local_smoke_run, flush=True)
    checked = config_lib.validate(config)  # the config's fields, before anything else
    config = checked.config
    if workdir is not None:
        distributed.initialize()  # several processes (hosts): before any backend use
        if config.data.get("synthetic_dir"):
            prepare_synthetic_if_absent(config)
        config_lib.check_inputs(config, checked.tasks)
        config = config.copy_and_resolve_references()  # saved with each checkpoint: a resume compares it
        config.data.tokenizer_sha256 = config_lib.tokenizer_sha256(config.data.tokenizer_path)
        if (note := config_lib.warmup_note(config, checked.optim)) and jax.process_index() == 0:
            print(f"jclip-train: {note}", flush=True)

    mesh = sharding.make_mesh(config.mesh, devices() if callable(devices) else devices, num_slices)
    config_lib.check_batch_split(config, mesh, checked.data)
    tx, schedule = optim.make_optimizer(checked.optim), optim.learning_rate_schedule(checked.optim)
    graphdef, init, abstract_state, shardings = train_step.abstract_train_state(
        lambda: JinaCLIP(config.model, rngs=nnx.Rngs(config.seed)), tx, mesh)
    sharding.check_replicated_fraction(shardings["params"], abstract_state["params"], mesh,
                                       config.get("max_replicated_fraction", None))
    step = train_step.make_train_step(graphdef, tx, config.loss, mesh, shardings, tasks=checked.tasks,
                                      micro_batches=config.micro_batches, schedule=schedule,
                                      activation_constraints=config.get("activation_constraints", True))
    return TrainSetup(config, checked.tasks, checked.data, checked.eval_tasks, mesh, checked.optim, tx, schedule,
                      graphdef, abstract_state, shardings, step, batch_spec(checked.data, checked.tasks, mesh),
                      rng_spec(mesh), init)


def batch_spec(data: DataConfig, tasks, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The step's global batch (data/batch.py) as ShapeDtypeStructs, rows sharded over the batch axes as the
    trainer's global batches are (pipeline.make_global_batch)."""
    rows = NamedSharding(mesh, P(sharding.batch_axes(mesh)))
    shapes = batch_schema.shapes(tasks, image_batch=data.image_batch_size, image_size=data.image_size,
                                 image_max_length=data.image_max_length, text_batch=data.text_batch_size,
                                 text_max_length=data.text_max_length)
    return {k: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=rows) for k, (shape, dtype) in shapes.items()}


def random_batch(run: TrainSetup, seed: int = 0) -> dict[str, jax.Array]:
    """A global batch of run.batch_spec's keys, shapes and shardings: token ids uniform in [1, vocab),
    standard-normal pixels (the benches' and tests' stand-in for the pipeline's batches)."""
    rng = np.random.default_rng(seed)
    vocab = run.config.model.text.vocab_size
    host = {k: (rng.integers(1, vocab, size=s.shape) if jnp.issubdtype(s.dtype, jnp.integer)
                else rng.normal(size=s.shape)).astype(s.dtype) for k, s in run.batch_spec.items()}
    return {k: jax.device_put(x, run.batch_spec[k].sharding) for k, x in host.items()}


def rng_spec(mesh) -> jax.ShapeDtypeStruct:
    key = jax.eval_shape(lambda: jax.random.key(0))
    return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, P()))


def prepare_synthetic_if_absent(config) -> None:
    """The demo's embedded dataset: written once under config.data.synthetic_dir."""
    from jclip_jax.data import synthetic

    root = config.data.synthetic_dir
    if jax.process_index() == 0:
        if not os.path.exists(os.path.join(root, "tokenizer.json")):  # written last but one: the splits are complete
            print(f"preparing the synthetic dataset in {root} ...", flush=True)
            synthetic.write_synthetic(root, image_size=config.model.vision.image_size)
        synthetic.write_tokenizers(root)  # a directory written before a tokenizer kind was added
    if jax.process_count() > 1:  # the other processes read it only once process 0 has written it
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jclip-train: synthetic dataset written")
