"""The device mesh and the logical-axis rules that place parameters and batches on it (MaxText style).

The towers name every parameter axis logically ('vocab', 'embed', 'heads', 'kv', 'mlp', 'layers' or None,
see models/layers.py); one ordered rules table maps each logical name to mesh axes. The mesh is a config
entry, e.g. `config.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))` (-1: all remaining devices).

Default rules: the batch is split over 'data' and 'fsdp' (FSDP shards parameters along 'embed' over the
same devices that split the batch); 'tensor' splits heads, MLP width and the vocabulary (Megatron style).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MeshAxes = str | tuple[str, ...] | None

DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", None),
    ("layers", None),
)


def mesh_shape(axes: Sequence[tuple[str, int]], num_devices: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """config.mesh (name, size) pairs, at most one size -1 (all remaining devices) -> (names, sizes).

    Example: mesh_shape([("data", -1), ("fsdp", 2), ("tensor", 1)], 8) -> (("data", "fsdp", "tensor"), (4, 2, 1)).
    """
    names = [name for name, _ in axes]
    sizes = [size for _, size in axes]
    if not axes or len(set(names)) != len(names):
        raise ValueError(f"config.mesh={list(axes)}: needs one or more distinct axis names")
    if sizes.count(-1) > 1 or any(s != -1 and (not isinstance(s, int) or s < 1) for s in sizes):
        raise ValueError(f"config.mesh={list(axes)}: sizes must be positive ints, with at most one -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"config.mesh={list(axes)}: {num_devices} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"config.mesh={list(axes)} needs {math.prod(sizes)} devices; there are {num_devices}")
    return tuple(names), tuple(sizes)


def make_mesh(axes: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None,
              num_slices: int | None = None) -> Mesh:
    """config.mesh on `devices` (default: all of jax's), laid out along the physical torus on TPU (jax's
    mesh_utils; a plain reshape on CPU). The trainer and jclip-compile (abstract TPU devices) both use it.

    Axis sizes need not match the physical axes (they may be split). With several slices (num_slices, default:
    the devices' distinct slice_index) the first mesh axis (normally 'data') is the one that spans them; its
    size must be a multiple of num_slices. Axes are `Auto` (GSPMD propagates shardings; shard_map regions
    name the axes explicitly).
    """
    from jax.experimental import mesh_utils

    devices = list(jax.devices() if devices is None else devices)
    names, sizes = mesh_shape(axes, len(devices))
    num_slices = num_slices or len({getattr(d, "slice_index", 0) for d in devices})
    if num_slices > 1:
        if sizes[0] % num_slices:
            raise ValueError(f"config.mesh={list(axes)}: the first axis {names[0]}={sizes[0]} must be a "
                             f"multiple of num_slices={num_slices}")
        ici = (sizes[0] // num_slices, *sizes[1:])
        dcn = (num_slices,) + (1,) * (len(sizes) - 1)
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
    else:
        grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
    return Mesh(np.asarray(grid), names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def mesh_axes_of(logical_name: str | None, rules, mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes a logical name maps to (first matching rule), restricted to axes of this mesh."""
    if logical_name is None:
        return ()
    for name, target in rules:
        if name == logical_name:
            target = () if target is None else (target,) if isinstance(target, str) else tuple(target)
            return tuple(a for a in target if a in mesh.axis_names)
    raise ValueError(f"logical axis {logical_name!r} has no sharding rule; "
                     f"rules cover {[n for n, _ in rules]}")


def logical_to_mesh_spec(logical_spec: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                         rules=DEFAULT_RULES) -> P:
    """PartitionSpec over mesh axes for one array with logical axis names `logical_spec`.

    A mesh axis is used at most once per array (first dimension wins) and a dimension that the mesh
    axes do not divide is left replicated (e.g. 2 heads on a 4-way 'tensor' axis).
    """
    if len(logical_spec) != len(shape):
        raise ValueError(f"logical spec {tuple(logical_spec)} does not match shape {tuple(shape)}")
    used: set[str] = set()
    out = []
    for name, dim in zip(logical_spec, shape, strict=True):
        axes = tuple(a for a in mesh_axes_of(name, rules, mesh) if a not in used)
        if not axes or dim % math.prod(mesh.shape[a] for a in axes):
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return P(*out)


def state_shardings(abstract_state, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for an nnx.State (abstract or concrete) whose Variables carry logical names.

    The names are read with `nnx.get_partition_spec` (metadata key `out_sharding`); variables without
    names are replicated.
    """
    import optax
    from flax import nnx

    def sharding_of(x, spec):
        if isinstance(x, optax.MaskedNode):  # optimizer state of a frozen parameter: holds nothing
            return x
        return NamedSharding(mesh, logical_to_mesh_spec(spec, x.shape, mesh, rules))

    specs = nnx.get_partition_spec(abstract_state)
    return jax.tree.map(sharding_of, abstract_state, specs, is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def batch_axes(mesh: Mesh, rules=DEFAULT_RULES) -> tuple[str, ...]:
    """The mesh axes the batch is split over (the 'batch' rule restricted to this mesh)."""
    return mesh_axes_of("batch", rules, mesh)


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    """Leading (batch) dimension split over the batch axes; every other dimension replicated."""
    return NamedSharding(mesh, P(batch_axes(mesh, rules)))


def check_replicated_fraction(shardings, abstract_params, mesh: Mesh, limit: float | None) -> None:
    """With an 'fsdp' axis > 1, fail if more than `limit` of the parameter elements are replicated on every
    device (a rule that does not apply, e.g. an axis the mesh does not divide), as MaxText does.
    limit=None turns the check off (config.max_replicated_fraction)."""
    if limit is None or mesh.shape.get("fsdp", 1) <= 1:
        return
    fraction = replicated_fraction(shardings, abstract_params)
    if fraction > limit:
        raise ValueError(f"{100 * fraction:.2f}% of the parameter elements are replicated on every device "
                         f"with mesh {dict(mesh.shape)}, above config.max_replicated_fraction={limit} "
                         "(check the fsdp size divides the model widths; None turns this check off)")


def replicated_fraction(shardings, abstract_state) -> float:
    """Fraction of parameter elements that every device holds in full (MaxText checks this is small)."""
    total = replicated = 0
    for sharding, x in zip(jax.tree.leaves(shardings), jax.tree.leaves(abstract_state), strict=True):
        total += x.size
        replicated += x.size if sharding.is_fully_replicated else 0
    return replicated / max(total, 1)
