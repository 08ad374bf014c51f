"""The training step on the 8-device CPU mesh: GradCache is exact, params are created sharded, and a few
steps of the tiny model drive the joint loss down."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jclip_jax import sharding
from jclip_jax.models import configs
from jclip_jax.models.clip import JinaCLIP
from jclip_jax.training import losses, optim
from jclip_jax.training import step as train_step


@pytest.fixture(autouse=True)
def highest_matmul_precision():
    """float32 matmuls at full precision for this module's comparisons: set per test, never at import (a
    global setting at import changed what every other module in the same pytest process computed)."""
    with jax.default_matmul_precision("highest"):
        yield



def loss_config(**overrides):
    c = ml_collections.ConfigDict(dict(stage=1, tasks=(), implementation="plain", tile_size=None,
                                       text_temperature=0.05, matryoshka_dims=(), matryoshka_weights=(),
                                       batch_axes=()))
    c.update(overrides)
    return c


def tiny_batch(rng, b, tasks, length=12, negatives=3):
    tokens = lambda *shape: rng.integers(1, 512, size=shape).astype(np.int32)
    batch = {}
    if "text_pair" in tasks:
        batch.update(text_query=tokens(b, length), text_passage=tokens(b, length))
    if "image_text" in tasks:
        image = rng.normal(size=(b, 32, 32, 3)).astype(np.float32)
        batch.update(image_caption=tokens(b, length), image=image)
    if "text_triplet" in tasks:
        batch.update(triplet_query=tokens(b, length), triplet_positive=tokens(b, length),
                     triplet_negatives=tokens(b, negatives, length))
    return batch


def test_grad_cache_equals_the_full_batch_gradient_for_any_embedding_function():
    mesh = sharding.make_mesh([("data", -1)])
    rng = np.random.default_rng(0)
    params = {"w_text": jnp.asarray(rng.normal(size=(6, 8)), jnp.float32),
              "w_image": jnp.asarray(rng.normal(size=(5, 8)), jnp.float32), "logit_scale": jnp.float32(2.0)}
    batch = {"text": jnp.asarray(rng.normal(size=(32, 6)), jnp.float32),
             "image": jnp.asarray(rng.normal(size=(32, 5)), jnp.float32)}

    def embed(p, b, index):
        return {"text": jnp.tanh(b["text"] @ p["w_text"]), "image": jnp.tanh(b["image"] @ p["w_image"])}

    def loss(p, e):
        value = losses.sharded_infonce(losses.l2_normalize(e["text"]), losses.l2_normalize(e["image"]),
                                       jnp.exp(p["logit_scale"]), mesh=mesh, batch_axes=("data",))
        return value, {}

    expected = jax.value_and_grad(lambda p: loss(p, embed(p, batch, 0))[0])(params)
    rows = NamedSharding(mesh, P("data"))
    for k in (2, 4):
        (value, _), grads = jax.jit(lambda p, b, k=k: train_step.grad_cache(embed, loss, p, b, k, rows))(
            params, batch)
        np.testing.assert_allclose(value, expected[0], rtol=1e-6)
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected[1]), strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5)


def test_gradcache_step_equals_plain_step_and_state_is_sharded():
    mesh = sharding.make_mesh([("data", 4), ("fsdp", 2)])
    config = optim.default_config(1, warmup_steps=0, total_steps=10)  # Table 2's stage-1 peak lr
    tx = optim.make_optimizer(config)
    make_model = lambda: JinaCLIP(configs.tiny(), rngs=nnx.Rngs(0))
    graphdef, state, shardings = train_step.create_train_state(make_model, tx, mesh)
    kernel = state["params"]["text_model"]["word_embeddings"]["embedding"][...]
    assert kernel.sharding.spec == P(None, "fsdp")  # ('vocab', 'embed'); no 'tensor' axis in this mesh
    assert state["opt_state"][0].mu["text_model"]["word_embeddings"]["embedding"][...].sharding.spec == \
        P(None, "fsdp")

    batch = tiny_batch(np.random.default_rng(1), 16, ("text_pair", "image_text"))
    results = []
    for micro_batches in (1, 2):
        step = train_step.make_train_step(graphdef, tx, loss_config(), mesh, shardings,
                                          micro_batches=micro_batches, dropout=False)
        new_state, metrics = step(jax.tree.map(jnp.copy, state), batch, jax.random.key(0))
        results.append((new_state["params"], metrics))
    (plain, plain_metrics), (cached, cached_metrics) = results
    np.testing.assert_allclose(cached_metrics["loss"], plain_metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(cached_metrics["grad_norm"], plain_metrics["grad_norm"], rtol=1e-5)
    for got, want in zip(jax.tree.leaves(cached), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    pairs = zip(jax.tree.leaves(plain), jax.tree.leaves(state["params"]), strict=True)
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in pairs)
    assert moved > 1e-5  # the update did something


def test_a_few_stage_3_steps_drive_the_joint_loss_down():
    mesh = sharding.make_mesh([("data", -1)])
    config = optim.default_config(3, peak_lr=1e-3, warmup_steps=0, total_steps=100)
    tx = optim.make_optimizer(config)
    graphdef, state, shardings = train_step.create_train_state(
        lambda: JinaCLIP(configs.tiny(), rngs=nnx.Rngs(0)), tx, mesh)
    lc = loss_config(stage=3, implementation="tiled")
    step = train_step.make_train_step(graphdef, tx, lc, mesh, shardings, dropout=True,
                                      schedule=optim.learning_rate_schedule(config))
    batch = tiny_batch(np.random.default_rng(2), 16, losses.STAGE_TASKS[3])
    history = []
    for i in range(6):
        state, metrics = step(state, batch, jax.random.key(i))
        history.append({k: float(v) for k, v in metrics.items()})
    logged = {"loss", "loss/text_triplet", "loss/image_text", "logit_scale", "grad_norm", "lr", "nonfinite"}
    assert set(history[0]) == logged
    assert history[-1]["loss"] < 0.8 * history[0]["loss"], [h["loss"] for h in history]
    assert int(state["step"]) == 6
    assert history[0]["lr"] == pytest.approx(1e-3)

    with pytest.raises(ValueError, match="batch keys"):
        step(state, {k: v for k, v in batch.items() if k != "image"}, jax.random.key(0))


def test_bad_step_settings_fail_early():
    mesh = sharding.make_mesh([("data", -1)])
    with pytest.raises(ValueError, match="micro_batches=0"):
        train_step.make_train_step(None, None, loss_config(), mesh, None, micro_batches=0)
    with pytest.raises(ValueError, match="not divisible by micro_batches=3"):
        train_step.check_batch({"text_query": np.zeros((16, 4)), "text_passage": np.zeros((16, 4))},
                               ("text_pair",), 3, 8)


def test_frozen_tower_stays_bit_identical_and_holds_no_optimizer_state():
    mesh = sharding.make_mesh([("data", -1)])
    tx = optim.make_optimizer(optim.default_config(1, peak_lr=1e-2, warmup_steps=0, total_steps=10,
                                                   frozen=("^vision_model/",)))
    graphdef, state, shardings = train_step.create_train_state(
        lambda: JinaCLIP(configs.tiny(), rngs=nnx.Rngs(0)), tx, mesh)
    adam_leaves = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state["opt_state"])]
    assert adam_leaves and not any("vision_model" in p for p in adam_leaves)
    assert any("text_model" in p for p in adam_leaves)

    before = jax.tree.map(np.asarray, nnx.to_pure_dict(state["params"]))
    step = train_step.make_train_step(graphdef, tx, loss_config(), mesh, shardings)
    for i in range(2):
        state, _ = step(state, tiny_batch(np.random.default_rng(i), 16, ("text_pair", "image_text")),
                        jax.random.key(i))
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(state["params"]))
    jax.tree.map(np.testing.assert_array_equal, before["vision_model"], after["vision_model"])
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), before["text_model"],
                                           after["text_model"]))
    assert all(changed)


@pytest.mark.parametrize("patterns,message", [(("^nothing/",), "matches no parameter"),
                                              ((".*",), "freezes every parameter")])
def test_bad_frozen_patterns_fail_naming_the_pattern(patterns, message):
    tx = optim.make_optimizer(optim.default_config(1, frozen=patterns))
    params = nnx.state(nnx.eval_shape(lambda: JinaCLIP(configs.tiny(), rngs=nnx.Rngs(0))), nnx.Param)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(tx.init, params)
