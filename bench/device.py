"""One-shot accelerator benchmark (a lent GPU or TPU machine, under ~8 minutes): one table.

    python bench/device.py                 # on the accelerator: v1 stage-1 shapes, bf16
    python bench/device.py --smoke         # the tiny model on CPU, seconds (CI runs this)

Rows:
  train step   jina-clip-v1 stage-1 step (text pairs + image-text, 77 tokens, 224 px, bf16, plain loss) at the
               largest per-device batch that fits (doubling from --start-batch until the compiler or the
               allocator refuses), remat on and off: step time, pairs/s, MFU against the chip's table peak.
  towers       each tower's forward+backward at that size, and timm/torch on the same device when torch sees
               it (CUDA); on TPU or without torch the peer column says why it is missing.
  attention    jax.nn.dot_product_attention implementations ('cudnn' and 'xla' on GPU; 'xla' elsewhere) at the
               image tower's shape.
Figures are medians of --steps timed runs after one warm-up. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if "--smoke" in sys.argv:  # before jax is imported: with libtpu installed jax would probe for a TPU
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jclip_jax.models import configs  # noqa: E402
from jclip_jax.models.clip import JinaCLIP  # noqa: E402
from jclip_jax.training import flops  # noqa: E402
from jclip_jax.training.config import base_config  # noqa: E402
from jclip_jax.training.setup import random_batch, setup  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model, small batch, 1 step: checks the script runs")
    p.add_argument("--start-batch", type=int, default=32, help="per-device batch to start doubling from")
    p.add_argument("--max-batch", type=int, default=1024, help="per-device batch to stop doubling at")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=420.0, help="stop searching larger batches after this")
    return p.parse_args(argv)


def timed(fn, steps: int) -> float:
    jax.block_until_ready(fn())  # compile + warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def tower_inputs(model_cfg, rows: int, length: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    size, vocab = model_cfg.vision.image_size, model_cfg.text.vocab_size
    tokens = lambda: rng.integers(1, vocab, size=(rows, length)).astype(np.int32)
    return {"text_query": tokens(), "text_passage": tokens(), "image_caption": tokens(),
            "image": rng.normal(size=(rows, size, size, 3)).astype(np.float32)}


def train_step_row(model_cfg, per_device: int, length: int, steps: int) -> dict:
    """Median step time of the stage-1 step at `per_device` rows per task per device (raises if it OOMs).
    The step is jclip-train's own (training/setup.setup) for a stage-1 config at this batch and length."""
    rows = per_device * jax.device_count()
    config = base_config(model_cfg, 1)
    config.mesh = (("data", -1),)
    config.data.synthetic_dir = "data/synthetic"  # fills the data paths; nothing is read without a workdir
    config.data.image_batch_size = config.data.text_batch_size = rows
    config.data.image_max_length = config.data.text_max_length = length
    run = setup(config)
    batch = random_batch(run)
    holder = {"state": run.init_state()}

    def step():
        holder["state"], metrics = run.step(holder["state"], batch, jax.random.key(0))
        return metrics

    seconds = timed(step, steps)
    peak, source = flops.peak_flops_per_device()
    return {"per_device_batch": per_device, "step_s": seconds, "pairs_per_s": run.pairs_per_step / seconds,
            "mfu": run.model_flops() / seconds / (peak * jax.device_count()), "peak_source": source}


def largest_fitting(model_cfg, args, length: int) -> dict | None:
    best, per_device, t_start = None, args.start_batch, time.perf_counter()
    while per_device <= args.max_batch and time.perf_counter() - t_start < args.budget_s:
        try:
            best = train_step_row(model_cfg, per_device, length, args.steps)
        except Exception as e:  # noqa: BLE001  (RESOURCE_EXHAUSTED surfaces as several error types)
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            break
        per_device *= 2
        if args.smoke:
            break
    return best


def tower_rows(model_cfg, rows: int, length: int, steps: int) -> list[dict]:
    model = JinaCLIP(model_cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    batch = tower_inputs(model_cfg, rows, length)
    out = []
    for tower, key, call in (("text", "text_query", "text_features"), ("image", "image", "image_features")):
        x = jnp.asarray(batch[key])
        grad = jax.jit(jax.grad(lambda p, x, call=call: jnp.sum(getattr(nnx.merge(graphdef, p), call)(x))))
        seconds = timed(lambda grad=grad, x=x: grad(params, x), steps)
        out.append({"tower": tower, "batch": rows, "jax_fwd_bwd_s": seconds, "torch_fwd_bwd_s": torch_peer(
            model_cfg, tower, rows, length, steps)})
    return out


def torch_peer(model_cfg, tower: str, rows: int, length: int, steps: int):
    """timm's EVA02 (image) on the same accelerator via torch, or why there is no figure."""
    if jax.devices()[0].platform != "gpu":
        return "n/a (torch peer only on GPU)"
    try:
        import timm
        import torch
    except ImportError:
        return "n/a (no torch/timm)"
    if not torch.cuda.is_available() or tower != "image":
        return "n/a (no CUDA torch)" if tower == "image" else "n/a (no torch Jina-BERT peer)"
    v = model_cfg.vision
    net = timm.create_model("eva02_base_patch16_clip_224", pretrained=False, num_classes=0, img_size=v.image_size,
                            depth=v.layers).cuda().to(torch.bfloat16)
    x = torch.randn(rows, 3, v.image_size, v.image_size, device="cuda", dtype=torch.bfloat16)

    def run():
        net.zero_grad(set_to_none=True)
        net(x).float().sum().backward()
        torch.cuda.synchronize()

    return timed(run, steps)


def attention_rows(model_cfg, rows: int, steps: int) -> list[dict]:
    v = model_cfg.vision
    tokens, heads = (v.image_size // v.patch_size) ** 2 + 1, v.width // v.head_width
    dtype = jnp.bfloat16 if model_cfg.dtype == "bfloat16" else jnp.float32
    q = jnp.ones((rows, tokens, heads, v.head_width), dtype)
    impls = ("cudnn", "xla") if jax.devices()[0].platform == "gpu" else ("xla",)
    out = []
    for impl in impls:
        f = jax.jit(jax.grad(lambda q, impl=impl: jnp.sum(jax.nn.dot_product_attention(q, q, q, implementation=impl)
                                                          .astype(jnp.float32))))
        try:
            out.append({"implementation": impl, "fwd_bwd_s": timed(lambda f=f: f(q), steps)})
        except Exception as e:  # noqa: BLE001  (an implementation this device lacks is a row, not a crash)
            out.append({"implementation": impl, "fwd_bwd_s": f"n/a ({str(e).splitlines()[0][:80]})"})
    return out


def fmt(x) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        model_cfg, length, args.start_batch, args.steps = configs.tiny(dtype="float32"), 16, 2, 1
    else:
        model_cfg, length = configs.jina_clip_v1(dtype="bfloat16", scan_layers=True), 77
    device = jax.devices()[0]
    print(f"device: {jax.device_count()} x {device.device_kind} ({device.platform})", flush=True)
    results = {"device": device.device_kind, "devices": jax.device_count(), "train_step": {}, "towers": [],
               "attention": []}
    lines = ["| what | setting | batch / device | seconds | pairs/s | MFU |", "|---|---|---|---|---|---|"]
    for remat in (True, False):
        cfg = model_cfg.copy_and_resolve_references()
        cfg.remat = remat
        row = largest_fitting(cfg, args, length)
        results["train_step"][f"remat={remat}"] = row
        if row:
            lines.append(f"| train step | remat={remat} | {row['per_device_batch']} | {row['step_s']:.4f} | "
                         f"{row['pairs_per_s']:.0f} | {100 * row['mfu']:.1f}% ({row['peak_source']}) |")
        else:
            lines.append(f"| train step | remat={remat} | none fits from {args.start_batch} | | | |")
    rows = max(2, args.start_batch // 2)
    for t in tower_rows(model_cfg, rows, length, args.steps):
        results["towers"].append(t)
        lines.append(f"| {t['tower']} tower fwd+bwd | jax / torch peer: {fmt(t['torch_fwd_bwd_s'])} | {rows} | "
                     f"{t['jax_fwd_bwd_s']:.4f} | | |")
    for a in attention_rows(model_cfg, rows, args.steps):
        results["attention"].append(a)
        lines.append(f"| dot_product_attention fwd+bwd | {a['implementation']} | {rows} | {fmt(a['fwd_bwd_s'])} | | |")
    print("\n".join(lines))
    print(json.dumps(results, default=str))


if __name__ == "__main__":
    main()
