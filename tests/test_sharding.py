"""Mesh construction and the logical-axis rules on the 8-device CPU mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jclip_jax import sharding
from jclip_jax.models import configs, layers
from jclip_jax.models.clip import JinaCLIP


def test_make_mesh_fills_the_minus_one_axis():
    mesh = sharding.make_mesh([("data", -1), ("fsdp", 2), ("tensor", 2)])
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3
    assert dict(sharding.make_mesh([("data", 8)]).shape) == {"data": 8}


@pytest.mark.parametrize("axes,message", [
    ([("data", 3)], "needs 3 devices"),
    ([("data", -1), ("fsdp", -1)], "at most one -1"),
    ([("data", -1), ("data", 2)], "distinct"),
    ([("data", -1), ("fsdp", 3)], "not divisible by 3"),
    ([("data", 0)], "positive"),
])
def test_bad_mesh_config_fails_naming_config_mesh(axes, message):
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(axes)


def test_rules_map_logical_names_and_leave_indivisible_dims_replicated():
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
    spec = sharding.logical_to_mesh_spec
    assert spec(("layers", "embed", "mlp"), (2, 64, 128), mesh) == P(None, "fsdp", "tensor")
    assert spec(("vocab", "embed"), (512, 64), mesh) == P("tensor", "fsdp")
    # 3 heads do not divide over 2 devices: replicated.
    assert spec(("embed", "heads", "kv"), (64, 3, 16), mesh) == P("fsdp", None, None)
    assert spec(("heads", "mlp"), (4, 8), mesh) == P("tensor", None)  # 'tensor' used once per array
    assert spec((), (), mesh) == P()
    # Axes absent from the mesh are dropped: a pure data-parallel mesh replicates every parameter.
    assert spec(("embed", "mlp"), (64, 128), sharding.make_mesh([("data", 8)])) == P(None, None)
    with pytest.raises(ValueError, match="no sharding rule"):
        spec(("channels",), (4,), mesh)


def test_batch_axes_follow_the_batch_rule():
    assert sharding.batch_axes(sharding.make_mesh([("data", 4), ("fsdp", 2)])) == ("data", "fsdp")
    assert sharding.batch_axes(sharding.make_mesh([("data", 4), ("tensor", 2)])) == ("data",)
    custom = (("batch", ("fsdp",)),) + sharding.DEFAULT_RULES[1:]
    mesh = sharding.make_mesh([("data", 4), ("fsdp", 2)])
    assert sharding.batch_sharding(mesh, custom).spec == P(("fsdp",))


def test_tiny_model_params_are_sharded_by_their_logical_names():
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
    params = nnx.state(nnx.eval_shape(lambda: JinaCLIP(configs.tiny(), rngs=nnx.Rngs(0))), nnx.Param)
    shardings = sharding.state_shardings(params, mesh)
    by_path = {jax.tree_util.keystr(k): v.spec for k, v in jax.tree_util.tree_leaves_with_path(shardings)}
    word = next(s for k, s in by_path.items() if "word_embeddings" in k)
    assert word == P("tensor", "fsdp")  # ('vocab', 'embed')
    assert next(s for k, s in by_path.items() if "logit_scale" in k) == P()
    # Almost every parameter element is split over some axis (MaxText's "sufficiently sharded" check).
    assert sharding.replicated_fraction(shardings, params) < 0.01


def test_embedding_lookup_under_fsdp_matches_a_plain_take_and_its_gradient():
    """layers.embedding_lookup (ids gathered over 'fsdp', a local lookup of the table's width slice, one
    all-to-all) gives jnp.take's rows and jnp.take's table gradient on a data 2 x fsdp 4 CPU mesh."""
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 4), ("tensor", 1)])  # 'vocab' -> a size-1 'tensor'
    table = jax.random.normal(jax.random.key(0), (50, 16), jnp.float32)
    ids = jax.random.randint(jax.random.key(1), (8, 5), 0, 50)
    weights = jax.random.normal(jax.random.key(2), (8, 5, 16))
    table = jax.device_put(table, NamedSharding(mesh, P(None, "fsdp")))
    ids = jax.device_put(ids, NamedSharding(mesh, P(("data", "fsdp"))))

    def loss(table, lookup):
        return jnp.sum(lookup(table) * weights)

    def sharded(table):
        with layers.activation_sharding(mesh, sharding.DEFAULT_RULES):
            return layers.embedding_lookup(table, ids, jnp.float32)

    out = jax.jit(sharded)(table)
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"))), 3)  # rows whole
    np.testing.assert_array_equal(out, np.take(np.asarray(table), np.asarray(ids), axis=0))
    grad = jax.jit(jax.grad(loss), static_argnums=1)(table, sharded)
    reference = np.zeros((50, 16), np.float32)
    np.add.at(reference, np.asarray(ids), np.asarray(weights))  # d sum(table[ids] * w) / d table
    np.testing.assert_allclose(grad, reference, rtol=1e-6, atol=1e-6)
