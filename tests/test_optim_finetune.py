"""Fine-tuning controls of the optimizer: lr/wd multipliers against torch.optim.AdamW parameter groups, and
layer-wise lr decay per block against hand-derived EVA-CLIP scales on the tiny model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from test_train_step_optim import cosine_with_warmup

from jclip_jax.models import configs
from jclip_jax.models.clip import JinaCLIP
from jclip_jax.training import optim


def test_lr_and_wd_multipliers_equal_torch_adamw_param_groups():
    """lr_mults scale a group's lr (decoupled decay included), wd_mults its weight decay: exactly a torch
    param group with lr * lr_mult and weight_decay * wd_mult."""
    rng = np.random.default_rng(0)
    params = {"tower_a": {"kernel": rng.normal(size=(4, 3)), "bias": rng.normal(size=(3,))},
              "tower_b": {"kernel": rng.normal(size=(3, 2))}}
    grads = [jax.tree.map(lambda x: rng.normal(size=np.shape(x)), params) for _ in range(3)]
    config = optim.default_config(1, peak_lr=1e-2, warmup_steps=2, total_steps=10, weight_decay=0.1,
                                  lr_mults=(("^tower_a/", 0.25), (".*", 2.0)),  # first match wins
                                  wd_mults=(("^tower_b/kernel", 3.0),))
    tx = optim.make_optimizer(config)
    jparams = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    opt_state = tx.init(jparams)
    for g in grads:
        updates, opt_state = jax.jit(tx.update)(jax.tree.map(jnp.float32, g), opt_state, jparams)
        jparams = jax.tree.map(jnp.add, jparams, updates)

    t = {(k, n): torch.tensor(v, dtype=torch.float64, requires_grad=True)
         for k, sub in params.items() for n, v in sub.items()}
    groups = [{"params": [t["tower_a", "kernel"]], "lr_mult": 0.25, "weight_decay": 0.1},
              {"params": [t["tower_a", "bias"]], "lr_mult": 0.25, "weight_decay": 0.0},
              {"params": [t["tower_b", "kernel"]], "lr_mult": 2.0, "weight_decay": 0.3}]
    opt = torch.optim.AdamW(groups, lr=1.0, betas=(0.9, 0.98), eps=1e-6)
    for step, g in enumerate(grads):
        for group in opt.param_groups:
            group["lr"] = cosine_with_warmup(step, 1e-2, 2, 10) * group["lr_mult"]
        for (k, n), p in t.items():
            p.grad = torch.tensor(g[k][n])
        opt.step()
    for (k, n), p in t.items():
        np.testing.assert_allclose(jparams[k][n], p.detach().numpy(), atol=1e-6, err_msg=f"{k}/{n}")


def tiny_params_and_grads():
    """Random params and grads in the tiny model's tree (its shapes, without running its initialisers)."""
    shapes = nnx.state(nnx.eval_shape(lambda: JinaCLIP(configs.tiny(), rngs=nnx.Rngs(0))), nnx.Param)
    leaves, treedef = jax.tree.flatten(shapes)
    rng = np.random.default_rng(1)
    params, grads = ([jnp.asarray(rng.normal(size=x.shape), x.dtype) for x in leaves] for _ in range(2))
    return jax.tree.unflatten(treedef, params), jax.tree.unflatten(treedef, grads)


def first_update(params, grads, **overrides):
    config = optim.default_config(1, peak_lr=1e-2, warmup_steps=0, total_steps=10, **overrides)
    tx = optim.make_optimizer(config)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    return {optim.param_path(p): np.asarray(u) for p, u in jax.tree_util.tree_leaves_with_path(updates)}


def test_layer_decay_scales_each_block_as_eva_clip():
    """Tiny model: 2 blocks per tower, decay 0.5 (text) / 0.8 (vision): block i gets d^(2 - i), embeddings
    d^3, the rest 1; lr_mults compose multiplicatively; frozen params get no update at all."""
    params, grads = tiny_params_and_grads()
    base = first_update(params, grads)
    scaled = first_update(params, grads, layer_decay={"text": 0.5, "vision": 0.8},
                          lr_mults=(("^vision_model/blocks/w1/", 10.0),), frozen=("^vision_model/pos_embed",))
    expected_per_block = {"text_model/layers/": [0.25, 0.5], "vision_model/blocks/": [0.64, 0.8]}
    for path, update in base.items():
        if path == "vision_model/pos_embed":
            assert not scaled[path].any()
            continue
        if path.startswith(tuple(expected_per_block)):
            per_block = np.asarray(next(v for k, v in expected_per_block.items() if path.startswith(k)))
            if path.startswith("vision_model/blocks/w1/"):
                per_block = per_block * 10.0
            assert update.shape[0] == 2
            for i in range(2):
                np.testing.assert_allclose(scaled[path][i], per_block[i] * update[i], rtol=1e-6, err_msg=path)
            continue
        if path.startswith(("text_model/word_embeddings", "text_model/token_type_embeddings", "text_model/emb_ln")):
            factor = 0.5 ** 3
        elif path.startswith(("vision_model/patch_embed", "vision_model/cls_token")):
            factor = 0.8 ** 3
        else:  # final norm, logit_scale
            factor = 1.0
        np.testing.assert_allclose(scaled[path], factor * update, rtol=1e-6, err_msg=path)
    assert "vision_model/norm/scale" in base and "logit_scale" in base


@pytest.mark.parametrize("overrides, message", [
    (dict(lr_mults=(("^nothing/", 0.1),)), "lr_mults pattern '\\^nothing/' matches no parameter"),
    (dict(wd_mults=(("^nothing/", 0.1),)), "wd_mults pattern '\\^nothing/' matches no parameter"),
])
def test_multiplier_patterns_that_match_nothing_fail(overrides, message):
    params, _ = tiny_params_and_grads()
    tx = optim.make_optimizer(optim.default_config(1, **overrides))
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(tx.init, params)


@pytest.mark.parametrize("overrides, message", [
    (dict(lr_mults=(("^a", -1.0),)), "lr_mults entry .* must be a \\(regex, multiplier >= 0\\) pair"),
    (dict(wd_mults=("^a",)), "wd_mults entry"),
    (dict(layer_decay={"text": 1.5}), "layer_decay.text=1.5 must lie in \\(0, 1\\]"),
    (dict(layer_decay={"audio": 0.5}), "layer_decay.audio: unknown tower"),
])
def test_bad_multiplier_settings_fail_before_compute(overrides, message):
    with pytest.raises(ValueError, match=message):
        optim.check_config(optim.default_config(1, **overrides))
