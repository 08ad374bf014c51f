"""The training config schema (ml_collections), shared by every file under configs/, and its validation.

A config file is `get_config(arg) -> ConfigDict` (big_vision style); it starts from `base_config()` and
sets what its stage needs. `validate(config)` runs before any compute and names the field at fault.

    config.model        a model config (jclip_jax/models/configs.py), with execution options
    config.init         where the weights come from when the workdir has no checkpoint:
                          checkpoint: a previous stage's workdir (its latest params) or a jina-clip HF dir
                          eva02 / jina_bert: tower state dicts (stage 1, the paper's initialisation)
    config.data         the grain pipeline (jclip_jax/data/pipeline.DataConfig fields)
    config.loss         losses.joint_loss's config (stage 1/2/3 or tasks, implementation, tile_size, ...)
    config.optim        optim.default_config(stage); its total_steps follows config.total_steps
    config.evals        held-out sets: image_text_dir (image<->text), text_pairs_dir (text->text), and
                        tasks: {name: jclip-eval task spec} (jclip_jax/evals/train_eval.py)
"""

from __future__ import annotations

import ml_collections

from jclip_jax import losses, optim
from jclip_jax.data.pipeline import DataConfig
from jclip_jax.models import attention
from jclip_jax.models import configs as model_configs
from jclip_jax.models.layers import REMAT_POLICIES

DATA_FIELDS = tuple(DataConfig.__dataclass_fields__)


def base_config(model: ml_collections.ConfigDict, stage: int) -> ml_collections.ConfigDict:
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


def data_config(config) -> DataConfig:
    """config.data -> the pipeline's DataConfig (image size and text lengths follow the model/stage)."""
    d = config.data
    return DataConfig(
        image_text_dir=d.image_text_dir, tokenizer_path=d.tokenizer_path, image_batch_size=d.image_batch_size,
        text_dir=d.text_dir, text_batch_size=d.text_batch_size if d.text_dir else 0,
        image_size=config.model.vision.image_size, image_max_length=d.image_max_length,
        text_max_length=d.text_max_length, crop_scale=tuple(d.crop_scale), random_crop=d.random_crop,
        text_weights=dict(d.text_weights) if d.text_weights else None, seed=d.seed,
        worker_count=d.worker_count, text_worker_count=d.text_worker_count, read_threads=d.read_threads,
        tfds_data_dir=d.tfds_data_dir,
        image_text_mixture=tuple((str(dir_), float(w)) for dir_, w in d.get("image_text", ())))


def validate(config) -> None:
    """Fail before any compute, naming the field and its value."""
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
    if config.model.get("attention", "xla") not in attention.IMPLEMENTATIONS:
        raise ValueError(f"config.model.attention={config.model.attention!r}; known: {attention.IMPLEMENTATIONS}")
    if config.get("nonfinite", "stop") not in ("stop", "skip"):
        raise ValueError(f"config.nonfinite={config.nonfinite!r} must be 'stop' or 'skip'")
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
    optim.check_config(optim_for_run(config))
    from jclip_jax.evals.train_eval import task_specs

    task_specs(config)  # task types, keys and paths of config.evals.tasks
    mixture = tuple(config.data.get("image_text", ()))
    for entry in mixture:
        if not (isinstance(entry, tuple | list) and len(entry) == 2 and isinstance(entry[0], str)
                and isinstance(entry[1], int | float) and entry[1] > 0):
            raise ValueError(f"config.data.image_text entry {entry!r} must be a (directory, weight > 0) pair")
    for name in ("image_text_dir", "tokenizer_path"):
        if not config.data[name] and not config.data.synthetic_dir and not (name == "image_text_dir" and mixture):
            raise ValueError(f"config.data.{name} is empty")


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


def warmup_note(config) -> str | None:
    """The note to print when optim_for_run clips the warmup, else None."""
    clipped = optim_for_run(config).warmup_steps
    if clipped != config.optim.warmup_steps:
        return (f"config.optim.warmup_steps={config.optim.warmup_steps} is not below config.total_steps="
                f"{config.total_steps}: warming up for {clipped} steps instead")
    return None


# Keys that may change when a run resumes from its workdir: run length and bookkeeping, execution options,
# evaluation sets, and where the initial weights come from (unused once a checkpoint exists). The LR
# schedule follows total_steps. Everything else under RESUME_REFUSED would make the restored state or the
# data iterator's position meaningless; other keys are allowed and printed.
RESUME_REFUSED = ("model.", "data.seed", "data.image_batch_size", "data.text_batch_size", "data.image_text_dir",
                  "data.text_dir", "data.text_weights", "data.text_buckets", "loss.stage", "loss.tasks")
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
    import json

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




# ------------------------------------------------------------------ jina-clip-v1's recipe (paper §4)

TABLE2 = {  # stage: (peak lr, image-text batch, text batch, steps, max length)
    1: (1e-4, 32_768, 32_768, 60_000, 77),
    2: (5e-6, 8_192, 8_192, 1_500, 512),
    3: (1e-6, 1_024, 1_024, 7_000, 512),
}


def jina_clip_v1_stage(stage: int, arg: str | None = None):
    """Table 2 of the paper for `stage`. `arg` 'runlocal' shrinks batches and steps for a smoke run."""
    lr, image_batch, text_batch, steps, max_length = TABLE2[stage]
    # bf16 compute with fp32 master params; remat per block so 32k batches fit with GradCache.
    model = model_configs.jina_clip_v1(dtype="bfloat16", remat=True, scan_layers=True)
    c = base_config(model, stage)
    c.total_steps = steps
    c.optim.peak_lr = lr
    c.optim.warmup_steps = {1: 1_000, 2: 100, 3: 500}[stage]  # [U] not given in the paper
    c.data.image_batch_size = image_batch
    c.data.text_batch_size = text_batch
    c.data.image_max_length = max_length
    c.data.text_max_length = max_length
    c.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))
    c.micro_batches = 1  # raise (e.g. 8) to fit the batch through GradCache on few devices
    # Point these at your prepared data (jclip-prepare) and tokenizer (jina-clip-v1's tokenizer.json):
    c.data.image_text_dir = "data/laion400m" if stage == 1 else "data/long_captions"
    c.data.text_dir = "data/text_pairs" if stage < 3 else "data/triplets"
    c.data.tokenizer_path = "data/tokenizer.json"
    c.evals.image_text_dir = "data/eval/flickr30k_test"
    c.evals.text_pairs_dir = None
    c.log_every, c.eval_every, c.checkpoint_every = 50, 5_000, 1_000
    if arg == "runlocal":
        c.total_steps, c.optim.warmup_steps = 10, 2
        c.data.image_batch_size = c.data.text_batch_size = 8
        c.log_every = c.checkpoint_every = 5
        c.eval_every = 0
    return c


# ------------------------------------------------------------------ jina-clip-v2's recipe (arXiv 2412.08802)

# stage: (image size, max length) as the paper states them (stage 1 short captions + text pairs at 224 px and
# 77 tokens; stage 2 long captions at 384 px and 512 tokens; stage 3 hard-negative triplets at 512 px).
V2_STAGE_SHAPES = {1: (224, 77), 2: (384, 512), 3: (512, 512)}
# [chosen] peak lr, image-text batch, text batch, steps: not found in the sources read; v1's Table 2 values.
V2_STAGE_SCHEDULE = {1: TABLE2[1][:4], 2: TABLE2[2][:4], 3: TABLE2[3][:4]}


def jina_clip_v2_stage(stage: int, arg: str | None = None):
    """jina-clip-v2's stage `stage`; 'runlocal' shrinks the model (tiny-v2), batches and steps for a smoke run.

    The image size changes between stages (224 -> 384 -> 512): `config.init.checkpoint` of the previous stage
    loads with vision_model/pos_embed resampled to the new grid (train.resample_image_positions).
    """
    image_size, max_length = V2_STAGE_SHAPES[stage]
    lr, image_batch, text_batch, steps = V2_STAGE_SCHEDULE[stage]
    model = model_configs.jina_clip_v2(dtype="bfloat16", remat=True, scan_layers=True)
    model.vision.image_size = image_size
    c = base_config(model, stage)
    c.total_steps = steps
    c.optim.peak_lr = lr
    c.optim.warmup_steps = {1: 1_000, 2: 100, 3: 500}[stage]  # [chosen] as v1
    c.data.image_batch_size, c.data.text_batch_size = image_batch, text_batch
    c.data.image_max_length = c.data.text_max_length = max_length
    # Matryoshka loss on jina-clip-v2's config.json `matryoshka_dimensions` [C]; equal weights [chosen].
    c.loss.matryoshka_dims = tuple(model.matryoshka_dimensions)
    c.loss.matryoshka_weights = (1.0,) * len(c.loss.matryoshka_dims)
    # [chosen] full fine-tuning of the text tower with its LoRA. jina-clip-v2's config.json says
    # lora_main_params_trainable: false; set text_lora='lora_only' to train only the LoRA factors of the text tower.
    c.text_lora = "all"
    c.data.image_text_dir = "data/image_text_short" if stage == 1 else "data/image_text_long"
    c.data.text_dir = "data/text_pairs" if stage < 3 else "data/triplets"
    c.data.tokenizer_path = "data/xlm_roberta_tokenizer.json"  # jina-embeddings-v3's tokenizer.json
    c.evals.image_text_dir = "data/eval/flickr30k_test"
    c.evals.text_pairs_dir = None
    if arg == "runlocal":
        c.model = model_configs.tiny_v2()
        c.loss.matryoshka_dims = tuple(c.model.matryoshka_dimensions)
        c.loss.matryoshka_weights = (1.0,) * len(c.loss.matryoshka_dims)
        c.total_steps, c.optim.warmup_steps = 10, 2
        c.data.image_batch_size = c.data.text_batch_size = 8
        c.data.image_max_length = c.data.text_max_length = 32
        c.log_every = c.checkpoint_every = 5
        c.eval_every = 0
    return c
