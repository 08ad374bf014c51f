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
"""

from __future__ import annotations

import re

import jax
import ml_collections
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


def make_optimizer(config) -> optax.GradientTransformation:
    """[clip_by_global_norm] -> AdamW with the decay mask and the warmup-cosine schedule; frozen
    parameters (config.frozen) are zeroed and hold no state. Clipping sees the trainable gradients only."""
    check_config(config)
    tx = optax.adamw(learning_rate=learning_rate_schedule(config), b1=config.b1, b2=config.b2,
                     eps=config.eps, weight_decay=config.weight_decay, mask=weight_decay_mask)
    if config.grad_clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
    frozen = tuple(config.get("frozen", ()))
    if not frozen:
        return tx
    return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()},
                                 lambda params: frozen_labels(params, frozen))
