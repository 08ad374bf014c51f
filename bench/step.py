"""Training-step time of the tiny and jina-clip-v1 configs, and GradCache's overhead at equal batch.

    python bench/step.py --model tiny --batch 64 --micro-batches 4
    python bench/step.py --model jina-clip-v1 --batch 8 --micro-batches 2 --steps 2 --seq-len 77

Each step is the stage's joint loss (stage 1: text pairs + image-text) on random tokens/pixels. The plain
step embeds the whole batch at once; GradCache embeds `--micro-batches` slices without gradients, then
replays each with a VJP, so it costs about one extra forward pass (target: <= 1.4x the plain step).
Compile time is reported separately; step times are the median of `--steps` timed steps after warm-up.
The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="model config: tiny | jina-clip-v1")
    parser.add_argument("--batch", type=int, default=64, help="global batch per task")
    parser.add_argument("--micro-batches", type=int, default=4, help="GradCache micro-batches")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--seq-len", type=int, default=32, help="text length (tokens)")
    parser.add_argument("--stage", type=int, default=1, choices=(1, 2, 3))
    parser.add_argument("--loss", default="plain", choices=("plain", "tiled"), help="loss implementation")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    parser.add_argument("--remat", action="store_true", help="rematerialise each block")
    parser.add_argument("--devices", type=int, default=0, help="virtual CPU devices (0: what jax finds)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.devices:  # must be set before jax is imported
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={args.devices}").strip()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax

    from jclip_jax.models import configs
    from jclip_jax.training.config import base_config
    from jclip_jax.training.setup import random_batch, setup

    model_cfg = configs.get(args.model)
    model_cfg.dtype = args.dtype
    model_cfg.remat = args.remat
    b, length = args.batch, args.seq_len

    def run_config(micro_batches):
        """The stage's training config at this batch and length (jclip-train's own set-up builds the step)."""
        c = base_config(model_cfg, args.stage)
        c.mesh = (("data", -1),)
        c.data.synthetic_dir = "data/synthetic"  # fills the data paths; nothing is read without a workdir
        c.data.image_batch_size = c.data.text_batch_size = b
        c.data.image_max_length = c.data.text_max_length = length
        c.loss.implementation = args.loss
        c.micro_batches = micro_batches
        return c

    t0 = time.perf_counter()
    state = setup(run_config(1)).init_state()
    init_s = time.perf_counter() - t0

    def time_variant(micro_batches):
        nonlocal state
        run = setup(run_config(micro_batches))
        batch = random_batch(run)
        t = time.perf_counter()
        state, metrics = run.step(state, batch, jax.random.key(0))
        jax.block_until_ready(metrics)
        first = time.perf_counter() - t  # compile + one step
        times = []
        for i in range(args.steps):
            t = time.perf_counter()
            state, metrics = run.step(state, batch, jax.random.key(i + 1))
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t)
        return {"compile_and_first_s": round(first, 3), "step_s": round(statistics.median(times), 4),
                "inputs": len(batch)}

    plain = time_variant(1)
    cached = time_variant(args.micro_batches)
    result = {
        "model": args.model, "stage": args.stage, "batch": b, "seq_len": length, "dtype": args.dtype,
        "devices": jax.device_count(), "platform": jax.devices()[0].platform, "loss": args.loss,
        "micro_batches": args.micro_batches, "init_s": round(init_s, 3),
        "plain": plain, "gradcache": cached,
        "gradcache_overhead": round(cached["step_s"] / plain["step_s"], 3),
    }
    print(f"{args.model} stage {args.stage}, batch {b} x {plain['inputs']} inputs, {jax.device_count()} "
          f"{result['platform']} device(s): plain {plain['step_s']:.4f} s/step, "
          f"GradCache x{args.micro_batches} {cached['step_s']:.4f} s/step "
          f"({result['gradcache_overhead']:.2f}x)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
