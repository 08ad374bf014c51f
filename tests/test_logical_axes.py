"""Every parameter carries logical axis names of its own rank, from the documented vocabulary."""

import pytest
from flax import nnx

from jclip_jax import JinaCLIP
from jclip_jax.models import configs

VOCABULARY = {"vocab", "embed", "heads", "kv", "mlp", "layers", None}


@pytest.mark.parametrize("make_config", [lambda: configs.tiny(add_projections=True), configs.tiny_v2],
                         ids=["v1", "v2"])
def test_every_param_has_logical_names(make_config):
    model = nnx.eval_shape(lambda: JinaCLIP(make_config(), rngs=nnx.Rngs(0)))
    seen = set()
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None, f"{'/'.join(map(str, path))} has no logical axis names"
        assert len(names) == len(var.shape), f"{'/'.join(map(str, path))}: {names} vs shape {var.shape}"
        assert set(names) <= VOCABULARY, names
        if "layers" in path or "blocks" in path:
            assert names[0] == "layers", path
        seen.update(names)
    assert {"vocab", "embed", "heads", "kv", "mlp", "layers"} <= seen
