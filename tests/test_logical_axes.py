"""Every parameter carries logical axis names of its own rank, from the documented vocabulary."""

from flax import nnx

from jclip_jax import JinaCLIP
from jclip_jax.models import configs

VOCABULARY = {"vocab", "embed", "heads", "kv", "mlp", "layers", None}


def test_every_param_has_logical_names():
    model = nnx.eval_shape(lambda: JinaCLIP(configs.tiny(add_projections=True), rngs=nnx.Rngs(0)))
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
