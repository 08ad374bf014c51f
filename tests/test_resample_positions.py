"""Stage chaining across image sizes (v2's 224 -> 384 -> 512 px): pos_embed resampled to the new grid,
everything else carried over unchanged."""

import numpy as np
from flax import nnx

from jclip_jax import sharding
from jclip_jax.convert import hf_layout
from jclip_jax.models import configs
from jclip_jax.models.clip import JinaCLIP
from jclip_jax.models.eva02 import resample_pos_embed
from jclip_jax.training import initial_weights, optim
from jclip_jax.training import step as train_step


def test_resample_keeps_cls_and_constant_fields_and_is_identity_on_the_same_grid():
    rng = np.random.default_rng(0)
    width = 5
    pos = np.concatenate([rng.normal(size=(1, 1, width)), np.broadcast_to(rng.normal(size=(1, 1, width)),
                                                                          (1, 16, width))], axis=1)
    out = resample_pos_embed(pos, 6)
    assert out.shape == (1, 37, width)
    np.testing.assert_array_equal(out[0, 0], pos[0, 0].astype(np.float32))
    np.testing.assert_allclose(out[0, 1:], np.broadcast_to(pos[0, 1], (36, width)), rtol=1e-6)
    np.testing.assert_array_equal(resample_pos_embed(pos, 4), pos.astype(np.float32))
    # a field increasing along the columns stays increasing along the columns
    ramp = np.zeros((1, 17, 1))
    ramp[0, 1:, 0] = np.tile(np.arange(4.0), 4)
    cols = resample_pos_embed(ramp, 8)[0, 1:, 0].reshape(8, 8)
    assert (np.diff(cols, axis=1) > 0).all() and np.allclose(np.diff(cols, axis=0), 0, atol=1e-6)


def test_initial_weights_from_another_image_size_load_with_resampled_positions():
    source = JinaCLIP(configs.tiny(), rngs=nnx.Rngs(1))  # 32 px, patch 8: grid 4
    target_cfg = configs.tiny()
    target_cfg.vision.image_size = 48  # grid 6
    mesh = sharding.make_mesh([("data", -1)])
    tx = optim.make_optimizer(optim.default_config(1, warmup_steps=0, total_steps=10))
    _, state, shardings = train_step.create_train_state(lambda: JinaCLIP(target_cfg, rngs=nnx.Rngs(0)), tx, mesh)

    params = hf_layout.flax_params(source)
    loaded = hf_layout.flat_values(initial_weights.fresh_state(state, shardings, params, tx)["params"])
    pos = ("vision_model", "pos_embed")
    assert loaded[pos].shape == (1, 37, 64)
    np.testing.assert_allclose(loaded[pos], resample_pos_embed(np.asarray(params[pos]), 6), rtol=1e-6)
    for key, value in params.items():
        if key != pos:
            np.testing.assert_array_equal(np.asarray(loaded[key]), np.asarray(value), err_msg="/".join(key))
