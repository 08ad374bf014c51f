"""Forward and forward+backward time of each tower, next to timm's EVA02 at the same size and batch (CPU).

    python bench/towers.py                       # jina-clip-v1 sizes, batch 4, fp32
    python bench/towers.py --model tiny --batch 32 --json
    python bench/towers.py --model jina-clip-v2 --batch 1 --layers 4   # v2 towers (peer: timm EVA02-L/14), 4 deep

Prints one line per measurement and, last, a JSON summary with the ratio jax/timm for the image tower
(< 1 means we are faster). Needs the torch extra (torch==2.13.0 CPU, timm) for the peer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from jclip_jax import JinaCLIP  # noqa: E402
from jclip_jax.models import configs  # noqa: E402


def best_of(fn, iters: int) -> float:
    fn()  # warm-up / compile
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def jax_tower_times(model, tower: str, batch: int, seq_len: int, iters: int) -> tuple[float, float]:
    cfg = model.cfg
    if tower == "text":
        x = jnp.asarray(np.random.default_rng(0).integers(1, cfg.text.vocab_size, (batch, seq_len)), jnp.int32)
        features = lambda m, x: m.text_features(x)
    else:
        s = cfg.vision.image_size
        x = jax.random.normal(jax.random.key(0), (batch, s, s, 3))
        features = lambda m, x: m.image_features(x)
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def forward(params, x):
        return features(nnx.merge(graphdef, params), x)

    @jax.jit
    def forward_backward(params, x):
        return jax.grad(lambda p: jnp.sum(features(nnx.merge(graphdef, p), x) ** 2))(params)

    fwd = best_of(lambda: jax.block_until_ready(forward(params, x)), iters)
    fwd_bwd = best_of(lambda: jax.block_until_ready(forward_backward(params, x)), iters)
    return fwd, fwd_bwd


def timm_eva_times(cfg, batch: int, iters: int) -> tuple[float, float]:
    import torch
    from torch_compat import import_timm

    timm = import_timm()
    v = cfg.vision
    grid = v.image_size // v.patch_size
    # v2's EVA02-L/14 interpolates its RoPE grid to pt_hw_seq_len (timm's ref_feat_shape); v1's does not.
    ref = v.pt_hw_seq_len if v.intp_freq else grid
    name = "eva02_large_patch14_clip_224" if v.width == 1024 else "eva02_base_patch16_clip_224"
    model = timm.create_model(
        name, pretrained=False, num_classes=0, img_size=v.image_size,
        patch_size=v.patch_size, embed_dim=v.width, depth=v.layers, num_heads=v.width // v.head_width,
        ref_feat_shape=(ref, ref))
    x = torch.randn(batch, 3, v.image_size, v.image_size)
    model.eval()

    def forward():
        with torch.no_grad():
            model(x)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        (model(x) ** 2).sum().backward()

    model.train()
    return best_of(forward, iters), best_of(forward_backward, iters)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="jina-clip-v1")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=77)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--layers", type=int, default=None, help="override both towers' depth (CPU-sized runs)")
    parser.add_argument("--json", action="store_true", help="(the JSON summary is always the last line)")
    args = parser.parse_args(argv)
    cfg = configs.get(args.model)
    if args.layers:
        cfg.text.num_hidden_layers = cfg.vision.layers = args.layers
    model = JinaCLIP(cfg, rngs=nnx.Rngs(0))
    res = {"model": args.model, "layers": args.layers or "full",
           "batch": args.batch, "seq_len": args.seq_len, "device": jax.devices()[0].platform,
           "threads": os.cpu_count()}
    res["text_fwd_s"], res["text_fwd_bwd_s"] = jax_tower_times(model, "text", args.batch, args.seq_len, args.iters)
    print(f"jax text tower   fwd {res['text_fwd_s']:.4f}s  fwd+bwd {res['text_fwd_bwd_s']:.4f}s", flush=True)
    res["image_fwd_s"], res["image_fwd_bwd_s"] = jax_tower_times(model, "image", args.batch, 0, args.iters)
    print(f"jax image tower  fwd {res['image_fwd_s']:.4f}s  fwd+bwd {res['image_fwd_bwd_s']:.4f}s", flush=True)
    res["timm_image_fwd_s"], res["timm_image_fwd_bwd_s"] = timm_eva_times(cfg, args.batch, args.iters)
    print(f"timm EVA02       fwd {res['timm_image_fwd_s']:.4f}s  fwd+bwd {res['timm_image_fwd_bwd_s']:.4f}s")
    res["image_fwd_ratio_jax_over_timm"] = res["image_fwd_s"] / res["timm_image_fwd_s"]
    res["image_fwd_bwd_ratio_jax_over_timm"] = res["image_fwd_bwd_s"] / res["timm_image_fwd_bwd_s"]
    print(f"ratio jax/timm   fwd {res['image_fwd_ratio_jax_over_timm']:.2f}x  "
          f"fwd+bwd {res['image_fwd_bwd_ratio_jax_over_timm']:.2f}x")
    print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in res.items()}))


if __name__ == "__main__":
    main()
