"""The training config: its schema and defaults, and all of its validation, run once before any compute.

A config file under configs/ is `get_config(arg) -> ConfigDict` (big_vision style): it starts from
`base_config()` and sets what its recipe needs; `parse_arg` reads its argument ("stage=2,runlocal").

    config.model        a model config (jclip_jax/models/configs.py), with execution options
    config.init         where the weights come from when the workdir has no checkpoint:
                          checkpoint: a previous stage's workdir (its latest params) or a jina-clip HF dir
                          eva02 / jina_bert / jina_embeddings_v3: tower state dicts (stage 1)
    config.data         the grain pipeline (jclip_jax/data/pipeline.DataConfig fields)
    config.loss         losses.joint_loss's config (stage 1/2/3 or tasks, implementation, tile_size, ...)
    config.optim        optim.default_config(stage); its total_steps follows config.total_steps
    config.evals        held-out sets: image_text_dir (image<->text), text_pairs_dir (text->text), and
                        tasks: {name: jclip-eval task spec} (jclip_jax/evals/train_eval.py)

Validation, in the order training/setup.py runs it (each raises ValueError or FileNotFoundError in one line
naming the field and its value; jclip-train and jclip-compile print it and exit 2):
    validate(config)                 the fields on their own -> Checked (tasks, run optimizer, data config)
    check_inputs(config, tasks)      jclip-train only: paths exist, tokenizer fits, prepared directories hold
                                     the record kinds the tasks need
    check_batch_split(config, mesh, data)  the batch sizes divide over the mesh's batch axes and micro_batches
    resume_changes(saved, config)    jclip-train, resuming: what may change since the checkpoint was written
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os

import ml_collections

from jclip_jax import sharding
from jclip_jax.data import batch as batch_schema
from jclip_jax.data import records
from jclip_jax.data.pipeline import DataConfig, text_dataset_weights
from jclip_jax.models.layers import ATTENTION_IMPLEMENTATIONS, REMAT_POLICIES
from jclip_jax.training import losses, optim


def parse_arg(arg: str | None, **defaults):
    """A config file's argument "stage=2,runlocal" -> ConfigDict(stage=2, runlocal=True), over `defaults`
    (whose types the values take; a bare name is True). big_vision's bvcc.parse_arg, without lazy sweeps."""
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        name, has_value, value = item.partition("=")
        if name not in defaults:
            raise ValueError(f"config argument {item!r}: unknown name {name!r}; known: {sorted(defaults)}")
        kind = type(defaults[name])
        if not has_value:
            out[name] = True
        elif kind is bool:
            out[name] = value.lower() in ("1", "true", "yes")
        else:
            try:
                out[name] = kind(value)
            except ValueError:
                raise ValueError(f"config argument {item!r}: {value!r} is not of type {kind.__name__}") from None
    return out


def base_config(model: ml_collections.ConfigDict, stage: int) -> ml_collections.ConfigDict:
    """Every field of a training config with its default; a config file sets what its recipe needs."""
    c = ml_collections.ConfigDict()
    c.model = model
    c.seed = 0
    c.total_steps = {1: 60_000, 2: 1_500, 3: 7_000}[stage]
    c.log_every = 50
    c.eval_every = 5_000  # 0: only at the end
    c.checkpoint_every = 1_000
    c.keep_checkpoints = 3
    c.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))
    c.micro_batches = 1  # > 1: GradCache, the same update as the whole batch at once
    c.peak_flops_per_device = None  # None: the device table, or a measured matmul on CPU
    c.max_replicated_fraction = 0.01  # with an fsdp axis > 1: fail above this share of replicated params
    c.nonfinite = "stop"  # a NaN/Inf loss or gradient: "stop" the run (nothing saved) or "skip" the update
    # Pin the towers' activations to the batch axes (models/layers.activation_sharding); False leaves them
    # to GSPMD (jclip-compile compares the two).
    c.activation_constraints = True
    c.local_smoke_run = ""  # set by `runlocal`: what the smoke run changed; printed first (training/setup.py)

    c.init = ml_collections.ConfigDict()
    c.init.checkpoint = ml_collections.FieldReference(None, field_type=str)
    c.init.eva02 = ml_collections.FieldReference(None, field_type=str)
    c.init.jina_bert = ml_collections.FieldReference(None, field_type=str)
    c.init.jina_embeddings_v3 = ml_collections.FieldReference(None, field_type=str)  # v2's text tower

    c.data = ml_collections.ConfigDict()
    c.data.image_text_dir = ""
    c.data.image_text = ()  # ((dir, weight), ...): a per-example weighted mixture instead of image_text_dir
    c.data.text_dir = ml_collections.FieldReference(None, field_type=str)
    c.data.tokenizer_path = ""
    c.data.tokenizer_sha256 = ""  # set by jclip-train from the tokenizer file: a resume refuses other content
    c.data.image_batch_size = 32_768
    c.data.text_batch_size = 32_768
    c.data.image_max_length = 77
    c.data.text_max_length = 77
    c.data.crop_scale = (0.9, 1.0)
    c.data.random_crop = True
    c.data.text_weights = ml_collections.FieldReference(None, field_type=dict)
    c.data.seed = 0
    c.data.worker_count = 0
    c.data.text_worker_count = 0
    c.data.read_threads = 4
    c.data.tfds_data_dir = ml_collections.FieldReference(None, field_type=str)
    c.data.synthetic_dir = ml_collections.FieldReference(None, field_type=str)  # demo: written if absent

    c.loss = ml_collections.ConfigDict()
    c.loss.stage = stage
    c.loss.implementation = "plain"  # or "tiled" when even the local logits rows are too big
    c.loss.tile_size = ml_collections.FieldReference(None, field_type=int)
    c.loss.precision = losses.DEFAULT_PRECISION  # logits matmuls: 'highest' (fp32), 'high' or 'default'
    c.loss.text_temperature = losses.TEXT_PAIR_TEMPERATURE
    c.loss.matryoshka_dims = ()
    c.loss.matryoshka_weights = ()

    c.optim = optim.default_config(stage)
    # v2 text-tower LoRA training mode (models/lora.py): 'all', 'lora_only' (base text weights frozen, no
    # optimizer state for them) or 'base_only' (LoRA factors held fixed); added to optim.frozen for the run.
    c.text_lora = "all"

    c.evals = ml_collections.ConfigDict()
    c.evals.image_text_dir = ml_collections.FieldReference(None, field_type=str)
    c.evals.text_pairs_dir = ml_collections.FieldReference(None, field_type=str)
    c.evals.batch_size = 64
    c.evals.tasks = ml_collections.ConfigDict()  # name -> dict(type=..., data=..., ...), as jclip-eval
    return c


SYNTHETIC_DIR = "data/synthetic"  # the embedded dataset (data/synthetic.py), written on first use


def runlocal(c, recipe: str, model: ml_collections.ConfigDict | None = None, *, max_length: int = 32):
    """Recipe `c` as a local smoke run (big_vision's `:runlocal`), in place; returns it.

    Kept from the recipe: the losses and task mix, Matryoshka (on `model`'s dims), the LoRA mode, the optimizer
    and its schedule's shape, the mesh, and the model's dtype, remat, remat policy, scan and attention.
    Changed: `model` (a small one of the same architecture and image size; None keeps the recipe's), the
    embedded synthetic data and its tokenizer (data/synthetic.py) instead of the pod's directories, no
    pretrained towers or previous stage (chain stages with --config.init.checkpoint=<runlocal workdir>),
    batches of 8 and `max_length` tokens, 10 steps. jclip-train says so in its first line.
    """
    if model is not None:
        kept = {k: c.model[k] for k in ("dtype", "remat", "remat_policy", "scan_layers", "attention")
                if k in c.model}
        c.model = model
        c.model.update(kept)
        if c.loss.matryoshka_dims:
            c.loss.matryoshka_dims = tuple(model.matryoshka_dimensions)
            c.loss.matryoshka_weights = (1.0,) * len(c.loss.matryoshka_dims)
    c.data.synthetic_dir = SYNTHETIC_DIR  # unset paths below point at its splits (with_synthetic_paths)
    c.data.image_text_dir, c.data.image_text, c.data.text_dir = "", (), None
    if model is not None:
        c.data.tokenizer_path = ""  # the synthetic tokenizer of the text tower's kind
    c.evals.image_text_dir = c.evals.text_pairs_dir = None
    c.evals.tasks = ml_collections.ConfigDict()
    c.init.checkpoint = c.init.eva02 = c.init.jina_bert = c.init.jina_embeddings_v3 = None
    c.total_steps, c.optim.warmup_steps = 10, 2
    c.data.image_batch_size = c.data.text_batch_size = 8
    c.data.image_max_length = c.data.text_max_length = max_length
    c.log_every = c.checkpoint_every = 5
    c.eval_every = 0  # the final evaluation, on the synthetic eval splits
    what = "a small model of the same architecture" if model is not None else "the recipe's model"
    c.local_smoke_run = (f"runlocal: a local smoke run of {recipe}: {what} at {c.model.vision.image_size} px, the "
                         f"synthetic data in {SYNTHETIC_DIR}, batches of 8, {max_length} tokens, 10 steps; losses, "
                         "task mix and optimizer as the recipe")
    return c


def data_config(config, tasks) -> DataConfig:
    """config.data -> the pipeline's DataConfig (image size and text lengths follow the model/stage); the
    text directory is read only when a task needs it."""
    d = config.data
    text_dir = d.text_dir if any(t in batch_schema.TEXT_TASK_RECORDS for t in tasks) else None
    return DataConfig(
        image_text_dir=d.image_text_dir, tokenizer_path=d.tokenizer_path, image_batch_size=d.image_batch_size,
        text_dir=text_dir, text_batch_size=d.text_batch_size if text_dir else 0,
        image_size=config.model.vision.image_size, image_max_length=d.image_max_length,
        text_max_length=d.text_max_length, crop_scale=tuple(d.crop_scale), random_crop=d.random_crop,
        text_weights=dict(d.text_weights) if d.text_weights else None, seed=d.seed,
        worker_count=d.worker_count, text_worker_count=d.text_worker_count, read_threads=d.read_threads,
        tfds_data_dir=d.tfds_data_dir,
        image_text_mixture=tuple((str(dir_), float(w)) for dir_, w in d.get("image_text", ())))


def with_synthetic_paths(config):
    """With config.data.synthetic_dir (the demo, runlocal): the data and eval paths left unset point at its
    splits, and the tokenizer at the one of the text tower's kind (data/synthetic.py)."""
    if not config.data.get("synthetic_dir"):
        return config
    config = config.copy_and_resolve_references()
    root, d, e = config.data.synthetic_dir, config.data, config.evals
    d.image_text_dir = d.image_text_dir or os.path.join(root, "train")
    xlmr = config.model.text.get("model_type") == "xlm_roberta"
    d.tokenizer_path = d.tokenizer_path or os.path.join(root, "xlmr_tokenizer.json" if xlmr else "tokenizer.json")
    text_split = "triplets" if config.loss.stage == 3 else "text_pairs"
    d.text_dir = d.text_dir or os.path.join(root, text_split)
    e.image_text_dir = e.image_text_dir or os.path.join(root, "eval")
    e.text_pairs_dir = e.text_pairs_dir or os.path.join(root, "eval_text_pairs")
    return config


@dataclasses.dataclass(frozen=True)
class Checked:
    """A validated config and what validation derived from it, passed down rather than recomputed."""

    config: ml_collections.ConfigDict  # synthetic-data paths filled in (with_synthetic_paths)
    tasks: tuple[str, ...]  # config.loss's tasks (losses.check_loss_config)
    optim: ml_collections.ConfigDict  # the run's optimizer config (optim_for_run)
    data: DataConfig  # the pipeline's config (data_config)
    eval_tasks: dict  # config.evals.tasks, checked (evals/train_eval.task_specs)


def validate(config) -> Checked:
    """Every field on its own, before anything is read or built; names the field and its value."""
    from jclip_jax.evals.train_eval import task_specs

    config = with_synthetic_paths(config)

    def positive(name, value):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"config.{name}={value!r} must be a positive integer")

    for name in ("total_steps", "log_every", "checkpoint_every", "keep_checkpoints", "micro_batches"):
        positive(name, config[name])
    if not isinstance(config.eval_every, int) or config.eval_every < 0:
        raise ValueError(f"config.eval_every={config.eval_every!r} must be >= 0 (0: only at the end)")
    positive("data.image_batch_size", config.data.image_batch_size)
    if config.data.text_dir:
        positive("data.text_batch_size", config.data.text_batch_size)
    positive("evals.batch_size", config.evals.batch_size)
    policy = config.model.get("remat_policy", "nothing")
    if policy not in REMAT_POLICIES:
        raise ValueError(f"config.model.remat_policy={policy!r}; known: {sorted(REMAT_POLICIES)}")
    if config.model.get("attention", "xla") not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"config.model.attention={config.model.attention!r}; known: {ATTENTION_IMPLEMENTATIONS}")
    if config.get("nonfinite", "stop") not in ("stop", "skip"):
        raise ValueError(f"config.nonfinite={config.nonfinite!r} must be 'stop' or 'skip'")
    if not isinstance(config.get("activation_constraints", True), bool):
        raise ValueError(f"config.activation_constraints={config.activation_constraints!r} must be True or False")
    for name in ("image_max_length", "text_max_length"):
        if not 2 <= config.data[name] <= 8192:
            raise ValueError(f"config.data.{name}={config.data[name]!r} must lie in [2, 8192]")
    scale = config.data.crop_scale
    if (not isinstance(scale, (tuple, list)) or len(scale) != 2
            or not all(isinstance(v, (int, float)) for v in scale) or not 0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"config.data.crop_scale={tuple(config.data.crop_scale)!r} must satisfy 0 < lo <= hi <= 1")
    tasks = losses.check_loss_config(config.loss)
    if ("text_pair" in tasks or "text_triplet" in tasks) and not config.data.text_dir:
        raise ValueError(f"config.loss (tasks {tasks}) needs text batches, but config.data.text_dir is not set")
    if config.loss.matryoshka_dims and len(config.loss.matryoshka_dims) != len(config.loss.matryoshka_weights):
        raise ValueError(f"config.loss.matryoshka_dims {tuple(config.loss.matryoshka_dims)} and "
                         f"matryoshka_weights {tuple(config.loss.matryoshka_weights)} differ in length")
    run_optim = optim_for_run(config)
    optim.check_config(run_optim)
    eval_tasks = task_specs(config)  # task types, keys and paths of config.evals.tasks
    mixture = tuple(config.data.get("image_text", ()))
    for entry in mixture:
        if not (isinstance(entry, tuple | list) and len(entry) == 2 and isinstance(entry[0], str)
                and isinstance(entry[1], int | float) and entry[1] > 0):
            raise ValueError(f"config.data.image_text entry {entry!r} must be a (directory, weight > 0) pair")
    for name in ("image_text_dir", "tokenizer_path"):
        if not config.data[name] and not (name == "image_text_dir" and mixture):
            raise ValueError(f"config.data.{name} is empty")
    return Checked(config, tasks, run_optim, data_config(config, tasks), eval_tasks)


def _local_path(path) -> bool:
    return bool(path) and "://" not in path and not path.startswith("tfds:")


def check_inputs(config, tasks) -> None:
    """What jclip-train reads, checked before any compute (local paths only): every path the config names
    exists, the tokenizer fits config.model.text, and every prepared directory holds records of the kind
    its use needs."""
    from jclip_jax.tokenizer import TextTokenizer

    mixture = {f"data.image_text[{i}]": d for i, (d, _) in enumerate(config.data.get("image_text", ()))}
    named = {"data.image_text_dir": config.data.image_text_dir, "data.text_dir": config.data.text_dir,
             "data.tokenizer_path": config.data.tokenizer_path, "init.checkpoint": config.init.checkpoint,
             "init.eva02": config.init.eva02, "init.jina_bert": config.init.jina_bert,
             "init.jina_embeddings_v3": config.init.get("jina_embeddings_v3"),
             "evals.image_text_dir": config.evals.image_text_dir, "evals.text_pairs_dir": config.evals.text_pairs_dir,
             **mixture}
    missing = [f"config.{k}={v!r}" for k, v in named.items() if _local_path(v) and not os.path.exists(v)]
    if missing:
        hint = "" if config.get("local_smoke_run") else (
            " (a recipe's local smoke run on the embedded data: add runlocal to its argument, e.g. "
            "--config configs/jina_clip_v1.py:stage=1,runlocal)")
        raise FileNotFoundError("these paths do not exist: " + ", ".join(missing) + hint)

    tok = TextTokenizer(config.data.tokenizer_path)
    if tok.vocab_size > config.model.text.vocab_size:
        raise ValueError(f"tokenizer {config.data.tokenizer_path!r} has {tok.vocab_size} tokens, more than "
                         f"config.model.text.vocab_size={config.model.text.vocab_size}")
    if tok.pad_id != config.model.text.pad_token_id:
        raise ValueError(f"tokenizer pad id {tok.pad_id} != config.model.text.pad_token_id="
                         f"{config.model.text.pad_token_id}")

    wanted = {"data.image_text_dir": (config.data.image_text_dir, "image_text"),
              **{key: (d, "image_text") for key, d in mixture.items()},
              "evals.image_text_dir": (config.evals.image_text_dir, "image_text"),
              "evals.text_pairs_dir": (config.evals.text_pairs_dir, "text_pair")}
    text_kinds = {batch_schema.TEXT_TASK_RECORDS[t][0] for t in tasks if t in batch_schema.TEXT_TASK_RECORDS}
    if len(text_kinds) > 1:
        raise ValueError(f"config.loss tasks {tasks} need both text pairs and triplets from one config.data.text_dir")
    if text_kinds:
        wanted["data.text_dir"] = (config.data.text_dir, text_kinds.pop())
    for key, (path, kind) in wanted.items():
        if not _local_path(path):
            continue
        try:
            manifest = records.read_manifest(path)
        except FileNotFoundError:
            raise ValueError(f"config.{key}={path!r} is not a prepared dataset (no {records.MANIFEST}; "
                             "run jclip-prepare)") from None
        if manifest.get("kind") != kind:
            stage = f" (config.loss.stage={config.loss.stage})" if key == "data.text_dir" else ""
            raise ValueError(f"config.{key}={path!r} holds {manifest.get('kind')!r} records; this run needs "
                             f"{kind!r} records there{stage}")
        empty = [name for name, entry in manifest["datasets"].items()
                 if not entry.get("count") or not entry.get("files")]
        if not manifest["datasets"] or empty:
            raise ValueError(f"config.{key}={path!r} holds no records" +
                             (f" in dataset(s) {sorted(empty)}" if empty else ""))
        if key == "data.text_dir":
            text_dataset_weights(manifest, config.data.text_weights, path)


def tokenizer_sha256(path: str) -> str:
    """The SHA-256 of the tokenizer file (local or gs://): the same path may hold another tokenizer later."""
    from etils import epath

    return hashlib.sha256(epath.Path(path).read_bytes()).hexdigest()


def check_batch_split(config, mesh, data: DataConfig) -> None:
    """The batch sizes the pipeline reads (`data`, validate's) divide over the devices the batch is split
    over, times micro_batches."""
    axes = sharding.batch_axes(mesh)
    devices = math.prod(mesh.shape[a] for a in axes)
    split = devices * config.micro_batches
    sizes = {"data.image_batch_size": data.image_batch_size}
    if data.text_dir:
        sizes["data.text_batch_size"] = data.text_batch_size
    for key, size in sizes.items():
        if size % split:
            over = " x ".join(f"{a}={mesh.shape[a]}" for a in axes) or "1"
            raise ValueError(f"config.{key}={size} is not divisible by {split}: the batch is split over the mesh "
                             f"axes {over} and config.micro_batches={config.micro_batches}")


def text_lora_frozen_patterns(config) -> tuple[str, ...]:
    """config.text_lora -> optim.frozen regexes; a LoRA mode on a text tower without LoRA is a config error."""
    from jclip_jax.models import lora

    mode = config.get("text_lora", "all")
    patterns = lora.frozen_patterns(mode)
    text = config.model.text
    if patterns and not (text.get("model_type") == "xlm_roberta" and text.lora_adaptations):
        raise ValueError(f"config.text_lora={mode!r} needs a text tower with LoRA (jina-clip-v2's); "
                         f"this model's text tower has none")
    return patterns


def optim_for_run(config):
    """config.optim with total_steps = config.total_steps (one source of truth for the run length).

    A warmup as long as the run or longer is clipped to a tenth of the run (`warmup_note` says so), so
    `--config.total_steps=N` works for any N >= 1."""
    o = config.optim.copy_and_resolve_references()
    o.total_steps = config.total_steps
    o.frozen = tuple(o.frozen) + text_lora_frozen_patterns(config)
    if isinstance(o.warmup_steps, int) and isinstance(o.total_steps, int) and o.warmup_steps >= o.total_steps > 0:
        o.warmup_steps = o.total_steps // 10
    return o


def warmup_note(config, run_optim=None) -> str | None:
    """The note to print when optim_for_run clips the warmup (run_optim: its result, if at hand), else None."""
    clipped = (run_optim or optim_for_run(config)).warmup_steps
    if clipped != config.optim.warmup_steps:
        return (f"config.optim.warmup_steps={config.optim.warmup_steps} is not below config.total_steps="
                f"{config.total_steps}: warming up for {clipped} steps instead")
    return None


# Keys that may change when a run resumes from its workdir: run length and bookkeeping, execution options,
# evaluation sets, and where the initial weights come from (unused once a checkpoint exists). The LR
# schedule follows total_steps. Everything else under RESUME_REFUSED would make the restored state or the
# data iterator's position meaningless; other keys are allowed and printed.
RESUME_REFUSED = ("model.", "data.seed", "data.image_batch_size", "data.text_batch_size", "data.image_text_dir",
                  "data.image_text", "data.text_dir", "data.text_weights", "data.text_buckets",
                  "data.tokenizer_sha256", "loss.stage", "loss.tasks")
RESUME_MODEL_SAFE = ("model.dtype", "model.remat", "model.remat_policy", "model.attention",
                     "model.text.hidden_dropout_prob", "model.vision.patch_dropout", "model.text.max_length",
                     "model.logit_scale_init_value")


def flat_dict(d, prefix=""):
    """A nested dict as {"a.b.c": leaf}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_changes(saved: dict, current) -> list[str]:
    """Compare the config saved with a checkpoint (a JSON dict) with `current`; returns the allowed changes
    as 'key: old -> new' lines, or raises ValueError naming every incompatible key in one line."""
    old, new = flat_dict(saved), flat_dict(json.loads(current.to_json_best_effort()))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    # a key only one side has is a field added or removed by a code change, not a change of this run
    refused = [k for k in changed if k.startswith(RESUME_REFUSED) and k not in RESUME_MODEL_SAFE
               and k in old and k in new]
    if refused:
        raise ValueError("the workdir's checkpoint was written with another config; incompatible changes: " +
                         ", ".join(f"config.{k} {old.get(k)!r} -> {new.get(k)!r}" for k in refused) +
                         " (use a new --workdir, with --config.init.checkpoint=<this workdir> to start from it)")
    return [f"config.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed]
