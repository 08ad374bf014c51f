"""The Table 2 optimizer against torch.optim.AdamW with the same parameter groups and a hand-written
warmup + cosine schedule."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jclip_jax.models import configs
from jclip_jax.models.clip import JinaCLIP
from jclip_jax.training import optim


def cosine_with_warmup(step, peak, warmup, total):
    if step < warmup:
        return peak * step / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_schedule_is_linear_warmup_then_cosine():
    config = optim.default_config(2, warmup_steps=10, total_steps=110)
    schedule = optim.learning_rate_schedule(config)
    for step in (0, 5, 10, 35, 60, 109, 110):
        expected = cosine_with_warmup(step, 5e-6, 10, 110)
        np.testing.assert_allclose(schedule(step), expected, rtol=1e-5, atol=1e-12)


def test_table_2_values():
    config = optim.default_config(1)
    values = (config.peak_lr, config.b1, config.b2, config.eps, config.weight_decay)
    assert values == (1e-4, 0.9, 0.98, 1e-6, 0.025)
    assert [optim.default_config(s).peak_lr for s in (1, 2, 3)] == [1e-4, 5e-6, 1e-6]


def test_weight_decay_mask_on_the_tiny_model():
    params = nnx.state(nnx.eval_shape(lambda: JinaCLIP(configs.tiny(), rngs=nnx.Rngs(0))), nnx.Param)
    leaves = jax.tree_util.tree_leaves_with_path(optim.weight_decay_mask(params))
    mask = {jax.tree_util.keystr(k): v for k, v in leaves}
    decayed = {k for k, v in mask.items() if v}
    kept = {k for k, v in mask.items() if not v}
    assert all("kernel" in k or "embeddings" in k for k in decayed)
    for name in ("logit_scale", "cls_token", "pos_embed", "['bias']", "['scale']"):
        assert any(name in k for k in kept) and not any(name in k for k in decayed), name
    assert any("word_embeddings" in k for k in decayed)


def test_adamw_steps_equal_torch_adamw_with_the_same_groups():
    rng = np.random.default_rng(0)
    params = {"dense": {"kernel": rng.normal(size=(4, 3)), "bias": rng.normal(size=(3,))},
              "logit_scale": np.asarray(2.6592)}
    grads = [jax.tree.map(lambda x: rng.normal(size=np.shape(x)), params) for _ in range(3)]
    config = optim.default_config(1, peak_lr=1e-2, warmup_steps=2, total_steps=10, grad_clip_norm=None)
    tx = optim.make_optimizer(config)

    jparams = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    opt_state = tx.init(jparams)
    for g in grads:
        updates, opt_state = tx.update(jax.tree.map(jnp.float32, g), opt_state, jparams)
        jparams = jax.tree.map(jnp.add, jparams, updates)

    t = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True)
         for k, v in [("kernel", params["dense"]["kernel"]), ("bias", params["dense"]["bias"]),
                      ("logit_scale", params["logit_scale"])]}
    opt = torch.optim.AdamW([{"params": [t["kernel"]], "weight_decay": 0.025},
                             {"params": [t["bias"], t["logit_scale"]], "weight_decay": 0.0}],
                            lr=1.0, betas=(0.9, 0.98), eps=1e-6)
    for step, g in enumerate(grads):
        for group in opt.param_groups:
            group["lr"] = cosine_with_warmup(step, 1e-2, 2, 10)
        t["kernel"].grad = torch.tensor(g["dense"]["kernel"])
        t["bias"].grad = torch.tensor(g["dense"]["bias"])
        t["logit_scale"].grad = torch.tensor(g["logit_scale"])
        opt.step()
    np.testing.assert_allclose(jparams["dense"]["kernel"], t["kernel"].detach().numpy(), atol=1e-6)
    np.testing.assert_allclose(jparams["dense"]["bias"], t["bias"].detach().numpy(), atol=1e-6)
    np.testing.assert_allclose(jparams["logit_scale"], t["logit_scale"].detach().numpy(), atol=1e-6)


def test_clipping_bounds_the_global_norm():
    tx = optim.make_optimizer(optim.default_config(1, grad_clip_norm=1.0, warmup_steps=0, total_steps=10))
    params = {"kernel": jnp.zeros((3, 3))}
    big = {"kernel": jnp.full((3, 3), 100.0)}
    # with clipping the first Adam step is unchanged in direction, but the moments see the clipped grads
    state = tx.init(params)
    _, state = tx.update(big, state, params)
    mu = state[1][0].mu["kernel"]
    np.testing.assert_allclose(jnp.linalg.norm(mu / 0.1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("field,value", [("peak_lr", 0.0), ("warmup_steps", 60_000), ("b2", 1.0),
                                         ("weight_decay", -1.0), ("grad_clip_norm", 0.0)])
def test_bad_optimizer_config_fails_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"optim.{field}"):
        optim.check_config(optim.default_config(1, **{field: value}))
