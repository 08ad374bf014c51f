"""models/layers.py: the 'flash' path's wrapper (padding to the kernel's blocks, the key mask as segment
ids, the layout change, shard_map over the batch) against jax.nn.dot_product_attention, on the CPU mesh.

The TPU kernel itself cannot run on a CPU; Pallas ships a pure-jnp reference of it (`mha_reference`, same
arguments and segment-id semantics), which stands in for it here. tests/test_compile.py compiles the real
kernel for a TPU topology."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu import flash_attention as fa

from jclip_jax import sharding
from jclip_jax.models import layers


@pytest.fixture
def reference_kernel(monkeypatch):
    def kernel(q, k, v, segment_ids=None, sm_scale=1.0):
        assert q.shape[2] % layers.FLASH_BLOCK == 0  # padded to whole blocks, (B, heads, T, head_dim)
        return fa.mha_reference(q, k, v, None, segment_ids=segment_ids, sm_scale=sm_scale)

    monkeypatch.setattr(fa, "flash_attention", kernel)
    monkeypatch.setattr(layers, "_platform", lambda: "tpu")
    with jax.default_matmul_precision("default"):  # some test modules set 'highest' globally at import
        yield


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("on_mesh", [False, True])
def test_flash_wrapper_matches_xla_attention(reference_kernel, masked, on_mesh):
    b, t, heads, head_dim = 8, 77, 4, 16  # 77 tokens: padded to 128
    q, k, v = (jax.random.normal(jax.random.key(i), (b, t, heads, head_dim), jnp.float32) for i in range(3))
    lengths = jnp.array([77, 5, 30, 1, 77, 64, 2, 40])
    key_mask = jnp.arange(t)[None, :] < lengths[:, None] if masked else None

    def flash(q, k, v, key_mask):
        return layers.dot_product_attention(q, k, v, key_mask=key_mask, implementation="flash")

    if on_mesh:
        mesh = sharding.make_mesh([("data", 4), ("fsdp", 2)])
        run = flash

        def flash(q, k, v, key_mask):  # noqa: F811 - the same call, traced under the train step's mesh context
            with layers.activation_sharding(mesh, sharding.DEFAULT_RULES):
                return run(q, k, v, key_mask)

    got = jax.jit(flash)(q, k, v, key_mask)
    want = jax.nn.dot_product_attention(q, k, v, mask=None if key_mask is None else key_mask[:, None, None, :])
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # every position, pads included


def test_flash_with_a_bias_keeps_xla_and_flash_on_cpu_fails_in_one_line():
    q = jnp.ones((2, 8, 2, 4))
    bias = jnp.zeros((2, 8, 8))  # JinaBERT's ALiBi: the TPU kernel has no bias input
    np.testing.assert_array_equal(layers.dot_product_attention(q, q, q, bias=bias, implementation="flash"),
                                  jax.nn.dot_product_attention(q, q, q, bias=bias))
    with pytest.raises(ValueError, match=r"^model.attention='flash' needs a TPU or a GPU; this step runs on 'cpu'"):
        layers.dot_product_attention(q, q, q, implementation="flash")
    with pytest.raises(ValueError, match=r"model.attention='fast'; known"):
        layers.dot_product_attention(q, q, q, implementation="fast")
