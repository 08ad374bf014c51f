"""Achieved FLOP/s of each tower's forward+backward on this host, per tower and per block, and what a text
block's parts cost (ALiBi bias, key mask, exact GELU, attention), all in one run on one device.

    python bench/tower_flops.py                 # jina-clip-v1 sizes, batch 8, fp32
    python bench/tower_flops.py --batch 4 --json

Why: the text tower once ran about 2x slower per FLOP than the image tower on CPU. This prints both side
by side (FLOPs from flops.py, i.e. the matmuls, times 3 for forward+backward), so a regression shows as a
gap between the two, and the block variants say which part of a text block it comes from.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jclip_jax import JinaCLIP  # noqa: E402
from jclip_jax.models import configs, eva02, jina_bert  # noqa: E402
from jclip_jax.models.clip import text_tower_type  # noqa: E402
from jclip_jax.training import flops


def seconds(fn, params, x, iters: int) -> float:
    """Best wall time of jit(grad(sum(fn(params, x)^2))) over iters runs (after one compile run)."""
    step = jax.jit(jax.grad(lambda p, x: jnp.sum(fn(p, x).astype(jnp.float32) ** 2)))
    jax.block_until_ready(step(params, x))
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(step(params, x))
        best = min(best, time.perf_counter() - t0)
    return best


def text_block_variant(graphdef, bias, mask, *, gelu_tanh=False, use_bias=True, use_mask=True, attention=True):
    """A JinaBertBlock forward written out, with parts switched off (same maths when all are on)."""
    def run(params, h):
        block = nnx.merge(graphdef, params)
        qkv = block.wqkv(h)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        attn = jax.nn.dot_product_attention(q, k, v, bias=bias if use_bias else None,
                                            mask=mask[:, None, None, :] if use_mask else None) if attention else q
        h = block.norm1(h + block.out_proj(attn))
        gate_value = block.gated_layers(h)
        mlp = jax.nn.gelu(gate_value[..., 0, :], approximate=gelu_tanh) * gate_value[..., 1, :]
        return block.norm2(h + block.wo(mlp))
    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="jina-clip-v1")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=77)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    cfg = configs.get(args.model)
    if text_tower_type(cfg.text) != "jina_bert":
        parser.error(f"--model {args.model}: the block variants are JinaBERT's; use a v1-style model (tiny, "
                     "jina-clip-v1)")
    b, length, t, v = args.batch, args.seq_len, cfg.text, cfg.vision
    out = {"model": args.model, "batch": b, "seq_len": length, "device": jax.devices()[0].device_kind}

    def report(name, s, flop):
        out[name] = {"ms": round(1e3 * s, 1), "gflop_per_s": round(flop / s / 1e9, 1)}
        print(f"{name:40s} {1e3 * s:9.1f} ms  {flop / s / 1e9:7.1f} GFLOP/s", flush=True)

    # Whole towers: FLOPs = 3 x forward (forward + backward).
    model = JinaCLIP(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, t.vocab_size, (b, length)), jnp.int32)
    pixels = jax.random.normal(jax.random.key(0), (b, v.image_size, v.image_size, 3))
    report("text tower", seconds(lambda p, x: nnx.merge(graphdef, p).text_features(x), params, ids, args.iters),
           3 * b * flops.text_forward_flops(t, length))
    report("image tower", seconds(lambda p, x: nnx.merge(graphdef, p).image_features(x), params, pixels,
                                  args.iters), 3 * b * flops.image_forward_flops(v))
    del model, params

    # One block of each; FLOPs from flops.py on a one-layer tower, so the counts cannot drift apart.
    one_text, no_image_blocks = t.copy_and_resolve_references(), v.copy_and_resolve_references()
    one_text.num_hidden_layers, no_image_blocks.layers = 1, 0
    d = t.hidden_size
    text_flop = 3 * b * flops.text_forward_flops(one_text, length)
    attention_flop = 3 * b * 2 * 2 * length * length * d  # the QK^T and AV part of that count
    block = jina_bert.JinaBertBlock(t, jnp.float32, jnp.float32, rngs=nnx.Rngs(0))
    block_def, block_params = nnx.split(block)
    h = jax.random.normal(jax.random.key(1), (b, length, d))
    bias = jina_bert.alibi_bias(t.num_attention_heads, length)
    mask = jnp.ones((b, length), bool).at[:, (3 * length) // 4:].set(False)  # a quarter padding
    report("text block", seconds(lambda p, x: nnx.merge(block_def, p)(x, bias, mask), block_params, h, args.iters),
           text_flop)
    for name, kw in (("text block, GELU tanh approximation", dict(gelu_tanh=True)),
                     ("text block, no ALiBi bias", dict(use_bias=False)),
                     ("text block, no bias and no mask", dict(use_bias=False, use_mask=False)),
                     ("text block, no attention (matmuls only)", dict(attention=False))):
        flop = text_flop if kw.get("attention", True) else text_flop - attention_flop
        report(name, seconds(text_block_variant(block_def, bias, mask, **kw), block_params, h, args.iters), flop)
    tokens, w = (v.image_size // v.patch_size) ** 2 + 1, v.width
    image_block = eva02.EvaBlock(v, jnp.float32, jnp.float32, rngs=nnx.Rngs(0))
    image_def, image_params = nnx.split(image_block)
    x = jax.random.normal(jax.random.key(2), (b, tokens, w))
    cos, sin = jnp.ones((1, tokens - 1, v.head_width)), jnp.zeros((1, tokens - 1, v.head_width))
    report("image block", seconds(lambda p, x: nnx.merge(image_def, p)(x, cos, sin), image_params, x, args.iters),
           3 * b * (flops.image_forward_flops(v) - flops.image_forward_flops(no_image_blocks)) / v.layers)
    ratio = out["text tower"]["gflop_per_s"] / out["image tower"]["gflop_per_s"]
    print(f"text / image tower FLOP/s: {ratio:.2f}x")
    if args.json:
        print(json.dumps(dict(out, text_over_image_flops_per_s=round(ratio, 3))))


if __name__ == "__main__":
    main()
