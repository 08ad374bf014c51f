"""The step's tower calls: text keys of equal shape run through the text tower as one batch, with the
same result as one call per key (the model's own per-key outputs are the reference)."""

import jax
import numpy as np
from flax import nnx

from jclip_jax.models import configs
from jclip_jax.models.clip import JinaCLIP
from jclip_jax.training import step as train_step


def test_one_text_tower_call_equals_one_call_per_key():
    model = JinaCLIP(configs.tiny(), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(0)
    ids = lambda *shape: rng.integers(1, 512, size=shape).astype(np.int32)
    batch = {"text_query": ids(4, 12), "text_passage": ids(4, 12), "image_caption": ids(4, 12),
             "triplet_negatives": ids(4, 3, 12), "triplet_query": ids(6, 12),  # another row count: own call
             "image": rng.normal(size=(4, 32, 32, 3)).astype(np.float32)}
    batch["text_passage"][:, 7:] = 0  # padding differs per key
    with jax.default_matmul_precision("highest"):
        got = jax.jit(lambda p, b: train_step.features(graphdef, p, b, None))(params, batch)
        for key, x in batch.items():
            if key == "image":
                want = model.image_features(x)
            elif key == "triplet_negatives":
                want = model.text_features(x.reshape(-1, 12)).reshape(4, 3, -1)
            else:
                want = model.text_features(x)
            np.testing.assert_allclose(got[key], want, rtol=1e-5, atol=1e-5, err_msg=key)


def test_text_tower_runs_once_per_shape_group():
    model = JinaCLIP(configs.tiny(), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    batch = {k: np.ones((4, 12), np.int32) for k in ("text_query", "text_passage", "image_caption")}
    jaxpr = jax.make_jaxpr(lambda p, b: train_step.features(graphdef, p, b, None))(params, batch)
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == 1 and scans[0].outvars[0].aval.shape[0] == 12  # one (12, L, D) pass for 3 keys
