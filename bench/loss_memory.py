"""Per-device memory of the sharded contrastive loss + gradient, compiled (never run) on virtual devices.

    python bench/loss_memory.py --batch 32768 --dim 768 --devices 64 --json

A "block" is one device's fp32 rows of the logits: (batch / devices) x batch x 4 bytes. The targets are
plain <= 3 blocks and tiled <= 0.5 block of XLA temp memory per device (`compiled.memory_analysis()`).
The last line printed is JSON {"block_bytes", "plain_temp_bytes", "tiled_temp_bytes", ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32768, help="global batch (pairs)")
    parser.add_argument("--dim", type=int, default=768, help="embedding size")
    parser.add_argument("--devices", type=int, default=64, help="virtual CPU devices, all on the batch axis")
    parser.add_argument("--negatives", type=int, default=0, help="hard negatives per query (7 in stage 3)")
    parser.add_argument("--tile-size", type=int, default=None, help="tiled: columns per tile (default local)")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # The device count must be fixed before jax is imported.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={args.devices}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jclip_jax.training import losses

    if jax.device_count() != args.devices:
        raise SystemExit(f"asked for {args.devices} devices, jax sees {jax.device_count()}")
    if args.batch % args.devices:
        raise SystemExit(f"--batch {args.batch} is not divisible by --devices {args.devices}")
    mesh = jax.make_mesh((args.devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = NamedSharding(mesh, P("data"))
    q = jax.ShapeDtypeStruct((args.batch, args.dim), jnp.float32, sharding=rows)
    negs = (jax.ShapeDtypeStruct((args.batch, args.negatives, args.dim), jnp.float32, sharding=rows)
            if args.negatives else None)
    scale = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))

    def temp_bytes(implementation):
        def loss(q, p, negs, scale):
            return losses.sharded_infonce(q, p, scale, negs, mesh=mesh, batch_axes=("data",),
                                          implementation=implementation, tile_size=args.tile_size)

        grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3) if negs is not None else (0, 1, 3)))
        compiled = grad_fn.lower(q, q, negs, scale).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    local = args.batch // args.devices
    block = local * args.batch * 4
    result = {"block_bytes": block, "plain_temp_bytes": temp_bytes("plain"),
              "tiled_temp_bytes": temp_bytes("tiled")}
    result["plain_blocks"] = round(result["plain_temp_bytes"] / block, 3)
    result["tiled_blocks"] = round(result["tiled_temp_bytes"] / block, 3)
    if not args.json:
        print(f"batch {args.batch}, dim {args.dim}, {args.devices} devices, local rows {local}: "
              f"one logits block = {block / 2**20:.1f} MiB")
        for name in ("plain", "tiled"):
            print(f"  {name:5s}: temp {result[name + '_temp_bytes'] / 2**20:8.1f} MiB "
                  f"= {result[name + '_blocks']:.3f} blocks")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
