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
    import ml_collections
    import numpy as np
    from flax import nnx

    from jclip_jax import losses, optim, sharding, train_step
    from jclip_jax.models import configs
    from jclip_jax.models.clip import JinaCLIP

    model_cfg = configs.get(args.model)
    model_cfg.dtype = args.dtype
    model_cfg.remat = args.remat
    mesh = sharding.make_mesh([("data", -1)])
    tx = optim.make_optimizer(optim.default_config(args.stage))
    t0 = time.perf_counter()
    graphdef, state, shardings = train_step.create_train_state(lambda: JinaCLIP(model_cfg, rngs=nnx.Rngs(0)),
                                                               tx, mesh)
    init_s = time.perf_counter() - t0

    rng = np.random.default_rng(0)
    b, length, vocab = args.batch, args.seq_len, model_cfg.text.vocab_size
    size = model_cfg.vision.image_size
    tokens = lambda *shape: rng.integers(1, vocab, size=shape).astype(np.int32)  # noqa: E731
    batch = {}
    tasks = losses.STAGE_TASKS[args.stage]
    if "text_pair" in tasks:
        batch.update(text_query=tokens(b, length), text_passage=tokens(b, length))
    if "text_triplet" in tasks:
        batch.update(triplet_query=tokens(b, length), triplet_positive=tokens(b, length),
                     triplet_negatives=tokens(b, 7, length))
    image = rng.normal(size=(b, size, size, 3)).astype(np.float32)
    batch.update(image_caption=tokens(b, length), image=image)
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    loss_config = ml_collections.ConfigDict(dict(stage=args.stage, implementation=args.loss))

    def time_variant(micro_batches):
        nonlocal state
        step = train_step.make_train_step(graphdef, tx, loss_config, mesh, shardings,
                                          micro_batches=micro_batches)
        t = time.perf_counter()
        state, metrics = step(state, batch, jax.random.key(0))
        jax.block_until_ready(metrics)
        first = time.perf_counter() - t  # compile + one step
        times = []
        for i in range(args.steps):
            t = time.perf_counter()
            state, metrics = step(state, batch, jax.random.key(i + 1))
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t)
        return {"compile_and_first_s": round(first, 3), "step_s": round(statistics.median(times), 4)}

    plain = time_variant(1)
    cached = time_variant(args.micro_batches)
    result = {
        "model": args.model, "stage": args.stage, "batch": b, "seq_len": length, "dtype": args.dtype,
        "devices": jax.device_count(), "platform": jax.devices()[0].platform, "loss": args.loss,
        "micro_batches": args.micro_batches, "init_s": round(init_s, 3),
        "plain": plain, "gradcache": cached,
        "gradcache_overhead": round(cached["step_s"] / plain["step_s"], 3),
    }
    print(f"{args.model} stage {args.stage}, batch {b} x {len(batch)} inputs, {jax.device_count()} "
          f"{result['platform']} device(s): plain {plain['step_s']:.4f} s/step, "
          f"GradCache x{args.micro_batches} {cached['step_s']:.4f} s/step "
          f"({result['gradcache_overhead']:.2f}x)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
