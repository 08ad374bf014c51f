"""Named Cloud TPU topologies as abstract (compile-only) devices, and the chips' figures.

`libtpu` (the `tpu` extra) compiles for a topology without a TPU: `jax.experimental.topologies` builds
devices that can be compiled for but not run on. Topology names are `<chip>:<grid>`, e.g. `v5e:2x2`,
`v5e:16x16`, `v5p:4x4x4`, `v4:4x4x4`, `v6e:8x8`; `num_slices` > 1 describes a multi-slice job whose
slices talk over the data-centre network (the mesh's first axis spans the slices).
"""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class Chip:
    """Vendor figures for one chip (dense bf16, no sparsity)."""

    name: str
    hbm_bytes: int
    peak_flops: float  # bf16 FLOP/s
    hbm_bandwidth: float  # bytes/s


GIB = 1024**3
# Cloud TPU system-architecture pages (per chip).
CHIPS = {
    "v4": Chip("TPU v4", 32 * GIB, 275e12, 1228e9),
    "v5e": Chip("TPU v5e", 16 * GIB, 197e12, 819e9),
    "v5p": Chip("TPU v5p", 95 * GIB, 459e12, 2765e9),
    "v6e": Chip("TPU v6e", 32 * GIB, 918e12, 1640e9),
}


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
    """'v5p:4x4x4' -> ('v5p', (4, 4, 4)); a clear error for anything else."""
    chip, _, grid = name.partition(":")
    try:
        dims = tuple(int(d) for d in grid.split("x"))
    except ValueError:
        dims = ()
    if chip not in CHIPS or not dims or min(dims) < 1:
        raise ValueError(f"--topology={name!r}: expected <chip>:<grid> with chip in {sorted(CHIPS)}, "
                         "e.g. v5e:2x2, v5p:4x4x4, v6e:8x8")
    return chip, dims


def chip_of(name: str) -> Chip:
    return CHIPS[parse_topology(name)[0]]


def topology_devices(name: str, num_slices: int = 1) -> list:
    """The abstract devices of `num_slices` slices of topology `name` (one device per chip)."""
    chip, _ = parse_topology(name)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # pytest-xdist: several processes load libtpu
    from jax.experimental import topologies

    kwargs = {"chip_config_name": "megacore"} if chip == "v4" else {}  # v4: one device per chip
    if num_slices > 1:
        kwargs["num_slices"] = num_slices
    try:
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs).devices)
    except RuntimeError as e:
        if "not installed" in str(e):
            raise ValueError("compiling for a TPU topology needs libtpu: pip install -e '.[tpu]'") from e
        raise ValueError(f"--topology={name!r} (num_slices={num_slices}): {str(e).splitlines()[0]}") from e
