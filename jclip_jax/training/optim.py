"""Optimizer of jina-clip (paper Table 2): AdamW, beta = (0.9, 0.98), eps = 1e-6, weight decay 0.025,
cosine decay after a linear warmup, a peak learning rate per stage, optional global-norm clipping.

Weight decay applies to the matrices only: every 'kernel' (linear, attention, patch-embedding conv)
and the 'embedding' tables (word and token-type embeddings). It does NOT apply to biases, LayerNorm
scales/biases, logit_scale, and EVA's cls_token and pos_embed (open_clip's exclusion list plus EVA-CLIP's
`no_weight_decay` set). Names are used rather than ndim because scanned layers stack every parameter
(a bias stacked over layers is 2-D).

Master parameters and the Adam moments stay float32 (bf16 is only the towers' compute dtype).

Frozen parameters (`config.frozen`, regexes searched in the parameter's path, e.g. "^vision_model/" for
LiT-style training or everything but "lora_" for LoRA-only tuning) get a zero update and hold no optimizer
state: the optimizer is an `optax.multi_transform` whose AdamW branch only sees the trainable leaves.

Fine-tuning controls on top (big_vision / EVA-CLIP style):
  lr_mults     ((regex, mult), ...): the first matching pattern scales a parameter's learning rate (its whole
               AdamW step, decoupled weight decay included, as a torch param group's lr does)
  wd_mults     ((regex, mult), ...): the first matching pattern scales a parameter's weight decay (which
               applies to kernels and embedding tables only)
  layer_decay  {"text": d, "vision": d}: layer-wise lr decay per tower, as EVA-CLIP/BEiT: of a tower's n
               blocks, block i (0-based) gets d^(n - i); its embeddings (everything before block 0: word and
               token-type embeddings and their LayerNorm; patch_embed, pos_embed, cls_token) d^(n + 1); the
               rest (final norm, projections, logit_scale) 1. Blocks are stacked on a leading 'layers' axis,
               so the scale is a vector along that axis. (EVA-CLIP leaves the text embedding LayerNorm at 1;
               here it goes with the embeddings it normalises.)
Multipliers compose: lr = schedule * lr_mult * layer scale.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

STAGE_PEAK_LR = {1: 1e-4, 2: 5e-6, 3: 1e-6}  # Table 2
DECAYED_PARAM_NAMES = ("kernel", "embedding")


def default_config(stage: int = 1, **overrides) -> ml_collections.ConfigDict:
    """`config.optim` with Table 2's values; warmup/total steps are run-specific (Table 2's totals:
    60,000 / 1,500 / 7,000)."""
    c = ml_collections.ConfigDict()
    c.peak_lr = STAGE_PEAK_LR[stage]
    c.warmup_steps = 1000
    c.total_steps = {1: 60_000, 2: 1_500, 3: 7_000}[stage]
    c.end_lr_ratio = 0.0
    c.b1, c.b2, c.eps = 0.9, 0.98, 1e-6
    c.weight_decay = 0.025
    c.grad_clip_norm = None  # e.g. 1.0; None: no clipping
    c.frozen = ()  # regexes searched in param_path(); matches get no update and no optimizer state
    c.lr_mults = ()  # ((regex, multiplier), ...): first match scales the learning rate
    c.wd_mults = ()  # ((regex, multiplier), ...): first match scales the weight decay
    c.layer_decay = ml_collections.ConfigDict({"text": 1.0, "vision": 1.0})  # EVA-CLIP layer-wise lr decay
    c.update(overrides)
    return c


def _param_name(path) -> str:
    """The parameter's own name: the last dict key on its path (skipping nnx's '.value' attribute)."""
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return str(names[-1]) if names else ""


def param_path(path) -> str:
    """'text_model/layers/wqkv/kernel': the dict keys on a params-tree path, joined by '/'.

    Stacked (scanned) layers share one path: the 'layers' axis is part of the array, not the path.
    """
    return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def frozen_labels(params, patterns) -> object:
    """Same tree as `params`, 'frozen' where a pattern matches param_path(), else 'trainable'.

    A pattern that matches nothing, or patterns that freeze everything, are config errors.
    """
    compiled = [re.compile(p) for p in patterns]
    paths = [param_path(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    for pattern in compiled:
        if not any(pattern.search(path) for path in paths):
            raise ValueError(f"config.optim.frozen pattern {pattern.pattern!r} matches no parameter "
                             f"(paths look like {paths[-1]!r})")
    if paths and all(any(p.search(path) for p in compiled) for path in paths):
        raise ValueError(f"config.optim.frozen={tuple(patterns)!r} freezes every parameter")
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if any(p.search(param_path(path)) for p in compiled) else "trainable", params)


# tower: (its param-path prefix, its stacked blocks' prefix, its embeddings: the params before block 0)
LAYER_DECAY_TOWERS = {
    "text": ("text_model/", "text_model/layers/", ("word_embeddings/", "token_type_embeddings/", "emb_ln/")),
    "vision": ("vision_model/", "vision_model/blocks/", ("patch_embed/", "pos_embed", "cls_token")),
}


def _first_match(pairs, path: str, default: float = 1.0) -> float:
    return next((float(mult) for pattern, mult in pairs if re.search(pattern, path)), default)


def layer_decay_scale(path: str, shape: tuple[int, ...], decays, num_blocks: dict[str, int]) -> np.ndarray | float:
    """The layer-wise lr scale of one parameter: a float, or for stacked blocks float32 (n, 1, ...) along
    the leading 'layers' axis (block i of n: d^(n - i))."""
    for tower, (prefix, blocks, embeddings) in LAYER_DECAY_TOWERS.items():
        d = float(decays.get(tower, 1.0))
        if d == 1.0 or not path.startswith(prefix):
            continue
        n = num_blocks[tower]
        if path.startswith(blocks):
            scales = (d ** (n - np.arange(n, dtype=np.float64))).astype(np.float32)
            return scales.reshape((n,) + (1,) * (len(shape) - 1))
        if path[len(prefix):].startswith(embeddings):
            return d ** (n + 1)
    return 1.0


def _num_blocks(params) -> dict[str, int]:
    """Blocks per tower: the leading (stacked 'layers') dim of its block params."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        for tower, (_, blocks, _) in LAYER_DECAY_TOWERS.items():
            if param_path(path).startswith(blocks):
                out[tower] = np.shape(leaf)[0]
    return out


def _check_patterns(name: str, pairs, paths) -> None:
    for pattern, _ in pairs:
        if not any(re.search(pattern, path) for path in paths):
            raise ValueError(f"config.optim.{name} pattern {pattern!r} matches no parameter "
                             f"(paths look like {paths[-1]!r})")


def _add_decayed_weights_by_path(decay_fn, wd_mults) -> optax.GradientTransformation:
    """updates + decay_fn(param_path) * params: decoupled weight decay with a per-parameter rate."""

    def init_fn(params):
        _check_patterns("wd_mults", wd_mults, [param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)])
        return optax.EmptyState()

    def update_fn(updates, state, params):
        def add(path, u, p):
            wd = decay_fn(param_path(path))
            return u if wd == 0.0 else u + wd * p

        return jax.tree_util.tree_map_with_path(add, updates, params), state

    return optax.GradientTransformation(init_fn, update_fn)


def _scale_by_lr_multipliers(lr_mults, decays) -> optax.GradientTransformation:
    """Multiplies each update by its lr_mults factor times its layer-decay scale (layer_decay_scale)."""

    def init_fn(params):
        _check_patterns("lr_mults", lr_mults, [param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)])
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        blocks = _num_blocks(updates)  # trace time: from the (trainable) tree itself

        def scale(path, u):
            name = param_path(path)
            tower = next((t for t, (prefix, _, _) in LAYER_DECAY_TOWERS.items() if name.startswith(prefix)), None)
            if tower is not None and float(decays.get(tower, 1.0)) != 1.0 and tower not in blocks:
                raise ValueError(f"config.optim.layer_decay.{tower} needs the tower's blocks to be trainable "
                                 f"({name} is, its blocks are frozen)")
            factor = _first_match(lr_mults, name) * layer_decay_scale(name, u.shape, decays, blocks)
            return u if isinstance(factor, float) and factor == 1.0 else u * jnp.asarray(factor, u.dtype)

        return jax.tree_util.tree_map_with_path(scale, updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def _adamw_with_multipliers(config, schedule) -> optax.GradientTransformation:
    """optax.adamw's chain (scale_by_adam -> add decayed weights -> scale by -lr) with a per-parameter weight
    decay (wd_mults) and, after the learning rate, a per-parameter lr scale (lr_mults x layer_decay)."""
    wd_mults = tuple(config.get("wd_mults", ()))

    def decay_rate(path: str) -> float:
        decayed = path.rsplit("/", 1)[-1] in DECAYED_PARAM_NAMES
        return config.weight_decay * _first_match(wd_mults, path) if decayed else 0.0

    return optax.chain(
        optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps),
        _add_decayed_weights_by_path(decay_rate, wd_mults),
        optax.scale_by_learning_rate(schedule),
        _scale_by_lr_multipliers(tuple(config.get("lr_mults", ())), dict(config.get("layer_decay", {}) or {})),
    )


def weight_decay_mask(params):
    """Same tree as `params` (an nnx.State or a dict), True where weight decay applies."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _param_name(path) in DECAYED_PARAM_NAMES, params)


def learning_rate_schedule(config) -> optax.Schedule:
    """Linear warmup from 0 to peak_lr, then cosine decay to peak_lr * end_lr_ratio at total_steps."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.peak_lr, warmup_steps=config.warmup_steps,
        decay_steps=config.total_steps, end_value=config.peak_lr * config.end_lr_ratio)


def check_config(config) -> None:
    for field in ("peak_lr", "eps"):
        if not config[field] > 0:
            raise ValueError(f"optim.{field}={config[field]!r} must be > 0")
    if not 0 <= config.warmup_steps < config.total_steps:
        raise ValueError(f"optim.warmup_steps={config.warmup_steps} must lie in [0, optim.total_steps="
                         f"{config.total_steps})")
    for field in ("b1", "b2"):
        if not 0 <= config[field] < 1:
            raise ValueError(f"optim.{field}={config[field]!r} must lie in [0, 1)")
    if config.weight_decay < 0:
        raise ValueError(f"optim.weight_decay={config.weight_decay!r} must be >= 0")
    if config.grad_clip_norm is not None and not config.grad_clip_norm > 0:
        raise ValueError(f"optim.grad_clip_norm={config.grad_clip_norm!r} must be > 0 or None")
    for pattern in config.get("frozen", ()):
        try:
            re.compile(pattern)
        except (re.error, TypeError) as e:
            raise ValueError(f"optim.frozen pattern {pattern!r} is not a regular expression: {e}") from None
    for name in ("lr_mults", "wd_mults"):
        for pair in config.get(name, ()):
            try:
                pattern, mult = pair
                re.compile(pattern)
                ok = float(mult) >= 0
            except (re.error, TypeError, ValueError):
                ok = False
            if not ok:
                raise ValueError(f"optim.{name} entry {pair!r} must be a (regex, multiplier >= 0) pair")
    for tower, decay in dict(config.get("layer_decay", {}) or {}).items():
        if tower not in LAYER_DECAY_TOWERS:
            raise ValueError(f"optim.layer_decay.{tower}: unknown tower (one of {sorted(LAYER_DECAY_TOWERS)})")
        if not isinstance(decay, int | float) or not 0 < decay <= 1:
            raise ValueError(f"optim.layer_decay.{tower}={decay!r} must lie in (0, 1]")


def make_optimizer(config) -> optax.GradientTransformation:
    """[clip_by_global_norm] -> AdamW with the decay mask and the warmup-cosine schedule; frozen
    parameters (config.frozen) are zeroed and hold no state. Clipping sees the trainable gradients only.
    `config` is checked by check_config (training/config.validate runs it once, before any compute)."""
    decays = dict(config.get("layer_decay", {}) or {})
    if config.get("lr_mults") or config.get("wd_mults") or any(d != 1.0 for d in decays.values()):
        tx = _adamw_with_multipliers(config, learning_rate_schedule(config))
    else:
        tx = optax.adamw(learning_rate=learning_rate_schedule(config), b1=config.b1, b2=config.b2,
                         eps=config.eps, weight_decay=config.weight_decay, mask=weight_decay_mask)
    if config.grad_clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
    frozen = tuple(config.get("frozen", ()))
    if not frozen:
        return tx
    return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()},
                                 lambda params: frozen_labels(params, frozen))
