"""Performance options that must not change the maths: remat policies, activation sharding constraints,
and the checks on loss precision and replicated parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jclip_jax import sharding
from jclip_jax.models import configs, layers
from jclip_jax.models.clip import JinaCLIP
from jclip_jax.training import losses


@pytest.fixture(autouse=True)
def highest_matmul_precision():
    """float32 matmuls at full precision for this module's comparisons: set per test, never at import (a
    global setting at import changed what every other module in the same pytest process computed)."""
    with jax.default_matmul_precision("highest"):
        yield



def _loss_and_grads(remat, policy="nothing", mesh=None):
    cfg = configs.tiny(remat=remat, remat_policy=policy)
    model = JinaCLIP(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, 512, size=(8, 12)), jnp.int32)
    pixels = jnp.asarray(rng.normal(size=(8, 32, 32, 3)), jnp.float32)

    probe = jnp.asarray(rng.normal(size=(8, 64)), jnp.float32)  # a fixed direction: the towers end in a
    # LayerNorm, so e.g. a sum of squares would be nearly constant and its gradients pure rounding noise

    def loss(p):
        m = nnx.merge(graphdef, p)
        return jnp.sum(m.text_features(ids) * probe) + jnp.sum(m.image_features(pixels) * probe)

    if mesh is None:
        return jax.jit(jax.value_and_grad(loss))(params)
    with layers.activation_sharding(mesh, sharding.DEFAULT_RULES):
        return jax.jit(jax.value_and_grad(loss))(params)


def test_remat_policies_and_activation_constraints_give_the_same_loss_and_gradients():
    want_loss, want_grads = _loss_and_grads(remat=False)
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
    for remat, policy, m in ((True, "nothing", None), (True, "dots", None), (False, "nothing", mesh)):
        got_loss, got_grads = _loss_and_grads(remat, policy, m)
        np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5, err_msg=f"{remat} {policy} {m}")
        for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
            # float32 sums in another order (sharded, recomputed): relative to each gradient's scale
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(np.abs(w).max()),
                                       err_msg=f"{remat} {policy} {m}")


def test_activation_constraint_pins_rows_to_the_batch_axes_and_is_a_noop_outside():
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
    x = jnp.zeros((8, 5, 64))
    assert layers.constrain_activation(x, "batch", None, None) is x  # no context: untouched
    with layers.activation_sharding(mesh, sharding.DEFAULT_RULES):
        y = jax.jit(lambda x: layers.constrain_activation(x * 2, "batch", None, None))(x)
    spec = tuple(y.sharding.spec) + (None,) * (3 - len(y.sharding.spec))
    assert spec == (("data", "fsdp"), None, None)


def test_unknown_remat_policy_and_precision_fail_with_the_field_name():
    with pytest.raises(ValueError, match="remat_policy='some'"):
        _loss_and_grads(True, "some")
    with pytest.raises(ValueError, match="loss.precision='fp32'"):
        losses.check_loss_config({"stage": 1, "precision": "fp32"})


def test_replicated_fraction_check_fails_when_fsdp_cannot_shard_the_widths():
    mesh = sharding.make_mesh([("data", 1), ("fsdp", 8)])
    tiny = configs.tiny()
    odd = configs.tiny()
    odd.text.hidden_size, odd.text.num_attention_heads = 60, 4  # 60 % 8 != 0: every text 'embed' replicated
    odd.vision.width, odd.vision.head_width = 60, 15
    for cfg, fails in ((tiny, False), (odd, True)):
        abstract = nnx.state(nnx.eval_shape(lambda cfg=cfg: JinaCLIP(cfg, rngs=nnx.Rngs(0))), nnx.Param)
        shardings = sharding.state_shardings(abstract, mesh)
        if fails:
            with pytest.raises(ValueError, match="max_replicated_fraction=0.01"):
                sharding.check_replicated_fraction(shardings, abstract, mesh, 0.01)
        else:
            sharding.check_replicated_fraction(shardings, abstract, mesh, 0.01)
        sharding.check_replicated_fraction(shardings, abstract, mesh, None)  # off
