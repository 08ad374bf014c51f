"""Contrastive losses against independent references: open_clip's ClipLoss (live torch), eq. 2 written out
in numpy/torch, and the single-device full matrix for the sharded and tiled forms on 8 CPU devices."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from jclip_jax.training import losses
from tests.torch_compat import import_open_clip


@pytest.fixture(autouse=True)
def highest_matmul_precision():
    """float32 matmuls at full precision for this module's comparisons: set per test, never at import (a
    global setting at import changed what every other module in the same pytest process computed)."""
    with jax.default_matmul_precision("highest"):
        yield



def unit(rng, *shape):
    x = rng.normal(size=shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def mesh_of(shape, names):
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


# ---------------------------------------------------------------------------------- definitions


def test_infonce_is_twice_open_clip_clip_loss_with_gradients():
    open_clip = import_open_clip()
    rng = np.random.default_rng(0)
    text, image = unit(rng, 12, 16), unit(rng, 12, 16)
    scale = 1 / 0.07

    t_text, t_image = torch.tensor(text, requires_grad=True), torch.tensor(image, requires_grad=True)
    t_scale = torch.tensor(scale, requires_grad=True)
    expected = 2 * open_clip.loss.ClipLoss()(t_image, t_text, t_scale)
    expected.backward()

    value, grads = jax.value_and_grad(losses.infonce, argnums=(0, 1, 2))(
        jnp.asarray(text), jnp.asarray(image), jnp.float32(scale))
    np.testing.assert_allclose(value, expected.item(), rtol=1e-5)
    np.testing.assert_allclose(grads[0], t_text.grad.numpy(), atol=1e-6)
    np.testing.assert_allclose(grads[1], t_image.grad.numpy(), atol=1e-6)
    np.testing.assert_allclose(grads[2], t_scale.grad.item(), rtol=1e-5)


def eq2_numpy(q, p, negs, scale):
    """Eq. 2 term by term, in float64 loops (independent of the jax code)."""
    q, p, negs = (x.astype(np.float64) for x in (q, p, negs))
    b = len(q)
    forward = backward = 0.0
    for r in range(b):
        denominator = sum(math.exp(scale * q[r] @ p[i]) + sum(math.exp(scale * q[r] @ negs[i, j])
                                                              for j in range(negs.shape[1]))
                          for i in range(b))
        forward += -math.log(math.exp(scale * q[r] @ p[r]) / denominator)
        backward += -math.log(math.exp(scale * p[r] @ q[r])
                              / sum(math.exp(scale * p[r] @ q[i]) for i in range(b)))
    return forward / b + backward / b


def eq2_torch(q, p, negs, scale):
    """Eq. 2 with explicit softmax denominators, for autograd gradients."""
    b, k, d = negs.shape
    pos = scale * (q * p).sum(-1)
    denominator = torch.exp(scale * q @ p.T).sum(1) + torch.exp(scale * q @ negs.reshape(b * k, d).T).sum(1)
    backward = torch.exp(scale * p @ q.T).sum(1)
    return (torch.log(denominator) - pos).mean() + (torch.log(backward) - pos).mean()


def test_infonce_hard_negatives_is_eq_2():
    rng = np.random.default_rng(1)
    q, p, negs, scale = unit(rng, 6, 8), unit(rng, 6, 8), unit(rng, 6, 7, 8), 20.0
    value, grads = jax.value_and_grad(losses.infonce_hard_negatives, argnums=(0, 1, 2, 3))(
        jnp.asarray(q), jnp.asarray(p), jnp.asarray(negs), jnp.float32(scale))
    np.testing.assert_allclose(value, eq2_numpy(q, p, negs, scale), rtol=1e-5)

    t = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (q, p, negs)]
    t_scale = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    eq2_torch(*t, t_scale).backward()
    for got, want in zip(grads, [*t, t_scale], strict=True):
        np.testing.assert_allclose(got, want.grad.numpy(), atol=1e-5)


def test_hard_negative_far_away_changes_nothing_but_close_one_raises_loss():
    rng = np.random.default_rng(2)
    u = np.eye(8, dtype=np.float32)[0]  # every query leans towards u, so the in-batch positives compete
    q = 2 * u + unit(rng, 4, 8)
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    p = q + 0.3 * unit(rng, 4, 8)
    p /= np.linalg.norm(p, axis=-1, keepdims=True)
    far = np.ascontiguousarray(np.broadcast_to(-u, (4, 7, 8)))  # opposite to every query (cos < -0.5)
    scale = 20.0
    base, plain = losses.infonce_hard_negatives(q, p, far, scale), losses.infonce(q, p, scale)
    assert float(plain) > 0.05  # not a saturated loss
    # The far negatives only add exp(scale * cos) terms to each query row's partition function, whose positive
    # term alone is exp(scale * cos(q_i, p_i)): the loss rises by at most the mean of their ratio.
    cos_far = np.einsum("id,jkd->ijk", q, far).reshape(4, -1)
    bound = np.mean(np.exp(scale * cos_far).sum(1) / np.exp(scale * np.sum(q * p, axis=1)))
    assert 0 <= float(base) - float(plain) <= bound + 1e-6 and bound < 1e-4 * float(plain)
    close = np.ascontiguousarray(np.broadcast_to(q[:, None], (4, 7, 8)))  # closer to each query than its positive
    assert losses.infonce_hard_negatives(q, p, close, scale) > base + 1.0


def test_image_text_scale_is_clamped_at_100():
    np.testing.assert_allclose(losses.image_text_scale(jnp.float32(2.6592)), math.exp(2.6592), rtol=1e-6)
    np.testing.assert_allclose(losses.image_text_scale(jnp.float32(7.0)), 100.0, rtol=1e-6)


# ------------------------------------------------------------------------------- across devices

MESHES = [  # (mesh shape, mesh axis names, the axes the batch is split over)
    ((8,), ("data",), ("data",)),
    ((4, 2), ("data", "tensor"), ("data",)),  # rows replicated over 'tensor'
    ((2, 2, 2), ("data", "fsdp", "tensor"), ("fsdp", "data")),  # batch over two axes, in swapped order
    ((2, 2, 2), ("data", "fsdp", "tensor"), ("tensor",)),
]


@pytest.mark.parametrize("negatives", [0, 3], ids=["pairs", "hard_negatives"])
@pytest.mark.parametrize("shape,names,batch_axes", MESHES, ids=[str(m[0]) + str(m[2]) for m in MESHES])
def test_sharded_equals_single_device_full_matrix(shape, names, batch_axes, negatives):
    rng = np.random.default_rng(3)
    b, d = 16, 8
    q, p = jnp.asarray(unit(rng, b, d)), jnp.asarray(unit(rng, b, d))
    negs = jnp.asarray(unit(rng, b, negatives, d)) if negatives else None
    scale = jnp.float32(9.0)
    if negs is None:
        reference = jax.value_and_grad(losses.infonce, argnums=(0, 1, 2))(q, p, scale)
    else:
        reference = jax.value_and_grad(lambda q, p, s, n: losses.infonce_hard_negatives(q, p, n, s),
                                       argnums=(0, 1, 2, 3))(q, p, scale, negs)
    mesh = mesh_of(shape, names)
    args, argnums = ((q, p, scale), (0, 1, 2)) if negs is None else ((q, p, scale, negs), (0, 1, 2, 3))
    for implementation, tile in (("plain", None), ("tiled", 2)):  # tile 2: sub-tiles where local rows > 2
        def loss(q, p, s, n=None, implementation=implementation, tile=tile):
            return losses.sharded_infonce(q, p, s, n, mesh=mesh, batch_axes=batch_axes,
                                          implementation=implementation, tile_size=tile)

        got = jax.jit(jax.value_and_grad(loss, argnums=argnums))(*args)
        assert max_diff(got, reference) < 1e-5, (implementation, tile)


def test_tiled_equals_plain_on_one_device_with_small_tiles():
    rng = np.random.default_rng(4)
    q, p, negs = unit(rng, 12, 8), unit(rng, 12, 8), unit(rng, 12, 7, 8)
    for n in (None, negs):
        def loss(q, p, implementation, tile=None, n=n):
            return losses.sharded_infonce(q, p, 5.0, n, mesh=None, implementation=implementation,
                                          tile_size=tile)

        plain = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)(q, p, "plain")
        tiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=(2, 3))(q, p, "tiled", 4)
        assert max_diff(plain, tiled) < 1e-5


def test_sharded_rejects_bad_settings():
    mesh = mesh_of((8,), ("data",))
    q = jnp.zeros((16, 4))
    with pytest.raises(ValueError, match="implementation"):
        losses.sharded_infonce(q, q, 1.0, mesh=mesh, batch_axes=("data",), implementation="flash")
    with pytest.raises(ValueError, match="not mesh axes"):
        losses.sharded_infonce(q, q, 1.0, mesh=mesh, batch_axes=("fsdp",))
    with pytest.raises(ValueError, match="tile_size=3"):
        losses.sharded_infonce(q, q, 1.0, mesh=mesh, batch_axes=("data",), implementation="tiled",
                               tile_size=3)
    with pytest.raises(ValueError, match="not divisible"):
        losses.sharded_infonce(jnp.zeros((12, 4)), jnp.zeros((12, 4)), 1.0, mesh=mesh, batch_axes=("data",))


# ------------------------------------------------------------------------- matryoshka and stages


def test_matryoshka_sums_weighted_renormalised_prefixes():
    rng = np.random.default_rng(5)
    q, p = rng.normal(size=(8, 16)).astype(np.float32), rng.normal(size=(8, 16)).astype(np.float32)
    dims, weights = (4, 8, 16), (0.5, 1.0, 2.0)
    got = losses.matryoshka_infonce(q, p, 20.0, dims=dims, weights=weights, mesh=None)
    expected = 0.0
    for d, w in zip(dims, weights, strict=True):  # open_clip on each renormalised prefix
        tq = torch.nn.functional.normalize(torch.tensor(q[:, :d]), dim=-1)
        tp = torch.nn.functional.normalize(torch.tensor(p[:, :d]), dim=-1)
        expected += w * 2 * import_open_clip().loss.ClipLoss()(tp, tq, torch.tensor(20.0)).item()
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    with pytest.raises(ValueError, match="matryoshka_dims"):
        losses.matryoshka_infonce(q, p, 1.0, dims=(32,), mesh=None)


def loss_config(**overrides):
    c = ml_collections.ConfigDict(dict(stage=1, tasks=(), implementation="plain", tile_size=None,
                                       text_temperature=0.05, matryoshka_dims=(), matryoshka_weights=(),
                                       batch_axes=("data",)))
    c.update(overrides)
    return c


def test_joint_loss_stage_3_logs_each_task_and_sums_them():
    rng = np.random.default_rng(6)
    f = {k: jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)
         for k in ("image_caption", "image", "triplet_query", "triplet_positive")}
    f["triplet_negatives"] = jnp.asarray(rng.normal(size=(8, 7, 16)), jnp.float32)
    mesh = mesh_of((8,), ("data",))
    total, metrics = jax.jit(lambda f, s: losses.joint_loss(f, s, loss_config(stage=3), mesh=mesh))(
        f, jnp.float32(2.6592))
    n = losses.l2_normalize
    triplet = eq2_numpy(np.asarray(n(f["triplet_query"])), np.asarray(n(f["triplet_positive"])),
                        np.asarray(n(f["triplet_negatives"])), 20.0)
    image = 2 * import_open_clip().loss.ClipLoss()(
        torch.tensor(np.asarray(n(f["image"]))), torch.tensor(np.asarray(n(f["image_caption"]))),
        torch.tensor(math.exp(2.6592))).item()
    np.testing.assert_allclose(metrics["loss/text_triplet"], triplet, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss/image_text"], image, rtol=1e-5)
    np.testing.assert_allclose(total, triplet + image, rtol=1e-5)
    assert set(metrics) == {"loss/text_triplet", "loss/image_text", "logit_scale"}


@pytest.mark.parametrize("field,value,message", [
    ("stage", 4, "loss.stage=4"),
    ("tasks", ("text_pair", "audio"), "unknown"),
    ("implementation", "ring", "loss.implementation='ring'"),
    ("tile_size", 0, "loss.tile_size=0"),
])
def test_bad_loss_config_fails_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        losses.check_loss_config(loss_config(**{field: value}))
