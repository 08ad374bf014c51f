"""What a compiled step says about a config on a topology: fit, per-chip HBM, FLOPs, collectives, a roofline.

    step = program.compile_train_step(config, devices)
    report = build_report(step, topology_name)     # a plain dict (JSON-able)
    print(format_report(report))

Per chip (one device per chip on every listed topology). Memory comes from the compiled program's own
`memory_analysis()`; FLOPs from its HLO with loop trip counts (hlo.py), next to `cost_analysis()`'s figure,
which counts each loop body once. The step-time bound is a roofline: max(matmul FLOPs / peak FLOP/s,
estimated HBM traffic / HBM bandwidth); it ignores communication, which can overlap with compute.
"""

from __future__ import annotations

import math
import re

import jax
import numpy as np

from jclip_jax import sharding
from jclip_jax.compile import hlo, topology

GIB = 1024**3
KNOBS = ("model.remat=True (or a lighter config.model.remat_policy)", "micro_batches=k (GradCache: activations of "
         "1/k of the batch)", "an fsdp mesh axis (config.mesh, shards params and optimizer state)",
         "loss.implementation='tiled' with loss.tile_size (the logits rows in tiles)")


def _shard_bytes(x) -> int:
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
    return math.prod(shape) * np.dtype(x.dtype).itemsize


def state_bytes_per_chip(abstract_state) -> dict[str, int]:
    """Bytes one chip holds of params, optimizer state and step (from the shardings, no compile needed)."""
    return {k: sum(_shard_bytes(x) for x in jax.tree.leaves(v)) for k, v in abstract_state.items()}


def replicated_params(abstract_params, mesh, rules=sharding.DEFAULT_RULES) -> list[tuple[str, int]]:
    """Params held in full by every chip although their logical names map to mesh axes of size > 1
    (e.g. a dimension the axis does not divide): (path, elements), largest first."""
    from flax import nnx

    specs = nnx.get_partition_spec(abstract_params)
    out = []
    for (path, spec), x in zip(jax.tree_util.tree_leaves_with_path(specs), jax.tree.leaves(abstract_params),
                               strict=True):
        names = tuple(spec) if spec is not None else ()
        wanted = {a for n in names for a in sharding.mesh_axes_of(n, rules, mesh) if mesh.shape[a] > 1}
        if wanted and x.sharding.is_fully_replicated:
            out.append((jax.tree_util.keystr(path), x.size))
    return sorted(out, key=lambda t: -t[1])


def _largest_allocations(error: str, limit: int = 8) -> list[str]:
    """The compiler's own list of the largest HBM allocations, from its RESOURCE_EXHAUSTED message."""
    lines = [ln.strip() for ln in error.splitlines()]
    out = []
    for i, ln in enumerate(lines):
        if re.match(r"^\d+\.\s+Size:", ln):
            detail = " ".join(x for x in lines[i + 1:i + 4] if x.startswith(("Operator:", "Shape:")))
            out.append(f"{ln} {detail}".strip())
    return out[:limit]


def build_report(step, topology_name: str, num_slices: int = 1) -> dict:
    """The report of a program.CompiledStep as a JSON-able dict (per-chip figures)."""
    run = step.run
    config, mesh = run.config, run.mesh
    chip = topology.chip_of(topology_name)
    chips = mesh.devices.size
    model_flops = run.model_flops() / chips
    state = state_bytes_per_chip(run.abstract_state)
    params = run.abstract_state["params"]
    param_bytes = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))
    report = {
        "topology": topology_name, "num_slices": num_slices, "chips": chips, "chip": chip.name,
        "mesh": dict(mesh.shape), "micro_batches": config.micro_batches,
        "batch": {k: list(v.shape) for k, v in run.batch_spec.items()},
        "remat": bool(config.model.remat), "dtype": config.model.dtype,
        "loss_implementation": config.loss.get("implementation", "plain"),
        "hbm_capacity_bytes": chip.hbm_bytes,
        "state_bytes": state, "batch_bytes": sum(_shard_bytes(x) for x in run.batch_spec.values()),
        "param_bytes_total": param_bytes,
        "replicated_fraction": sharding.replicated_fraction(run.shardings["params"], params),
        "replicated_params": replicated_params(params, mesh)[:10],
        "model_flops": model_flops,
        "lower_seconds": step.lower_seconds, "compile_seconds": step.compile_seconds,
    }
    if step.compiled is None:
        report["fits"] = False
        report["error"] = (step.error or "not compiled").splitlines()[0][:400]
        report["compiler_message"] = (step.error or "")[:20_000]
        report["largest_allocations"] = _largest_allocations(step.error or "")
        message = step.error or ""
        used = (re.search(r"Used ([\d.]+)([GMK]) of ([\d.]+)([GMK]) hbm", message)
                or re.search(r"HLO temporaries \(([\d.]+)([GMK])\) exceeds available HBM \(([\d.]+)([GMK])\)", message))
        if used:  # the compiler's own figures: what the program needs, what the chip offers
            scale = {"G": GIB, "M": 1024**2, "K": 1024}
            report["hbm_bytes"] = float(used.group(1)) * scale[used.group(2)]
            report["hbm_capacity_bytes"] = float(used.group(3)) * scale[used.group(4)]
        report["knobs"] = list(KNOBS)
        return report

    mem = step.compiled.memory_analysis()
    memory = {"argument": mem.argument_size_in_bytes, "output": mem.output_size_in_bytes,
              "alias": mem.alias_size_in_bytes, "temp": mem.temp_size_in_bytes,
              "generated_code": mem.generated_code_size_in_bytes}
    total = memory["argument"] + memory["output"] - memory["alias"] + memory["temp"] + memory["generated_code"]
    cost = step.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    report.update({"fits": total <= chip.hbm_bytes, "memory": memory, "hbm_bytes": total,
                   "cost_analysis_flops": float(cost.get("flops", 0.0)),
                   "pairs_per_step": run.pairs_per_step})
    report.update(hlo_fields(hlo.analyze(step.compiled.as_text()), report))
    if not report["fits"]:
        report["knobs"] = list(KNOBS)
    return report


def hlo_fields(analysis: hlo.Analysis, report: dict) -> dict:
    """The report's fields read from the compiled HLO (FLOPs, dtype mix, collectives, roofline), given the
    report's chip, model FLOPs and pairs per step. bench/scaling.py --reanalyze reruns it on saved HLO."""
    chip = topology.chip_of(report["topology"])
    model_flops = report["model_flops"]
    compute_s = analysis.matmul_flops / chip.peak_flops
    memory_s = analysis.hbm_bytes / chip.hbm_bandwidth
    bound = max(compute_s, memory_s)
    mix = analysis.dtype_mix
    mix_total = sum(mix.values()) or 1.0
    return {
        "hlo_matmul_flops": analysis.matmul_flops,
        "flops_ratio": analysis.matmul_flops / model_flops if model_flops else float("nan"),
        "unknown_trip_counts": analysis.unknown_trip_counts,
        "unknown_kernels": sorted(set(analysis.unknown_kernels)),
        "loops": len(analysis.loops),
        "dtype_mix": {k: v / mix_total for k, v in sorted(mix.items(), key=lambda kv: -kv[1])},
        "matmul_sources": _minority_sources(analysis.matmul_sources, mix, mix_total),
        "collectives": analysis.collectives, "collective_bytes": analysis.collective_bytes,
        "largest_collectives": dict(sorted(analysis.collective_arrays.items(), key=lambda kv: -kv[1]["bytes"])[:8]),
        "hbm_traffic_bytes": analysis.hbm_bytes,
        "roofline": {"compute_s": compute_s, "memory_s": memory_s, "step_s_lower_bound": bound,
                     "pairs_per_s_upper_bound": report["pairs_per_step"] / bound if bound else 0.0,
                     "mfu_upper_bound": model_flops / (bound * chip.peak_flops) if bound else 0.0},
    }


def _minority_sources(sources: dict, mix: dict, total: float, top: int = 3) -> dict:
    """Where the matmuls outside the main dtype mix come from: mix -> {jax op_name: share of all matmul FLOPs},
    the `top` largest per mix, so an f32 matmul in a bf16 config can be traced to the line that made it."""
    minority = sorted(mix, key=lambda k: -mix[k])[1:]
    return {k: {name: flops / total for name, flops in sorted(sources[k].items(), key=lambda kv: -kv[1])[:top]}
            for k in minority}


def _gib(x: float) -> str:
    return f"{x / GIB:.2f} GiB"


def format_report(r: dict) -> str:
    """The report as the text jclip-compile prints."""
    lines = [f"jclip-compile: {r['topology']} x{r['num_slices']} slice(s), {r['chips']} chips ({r['chip']}), "
             f"mesh {r['mesh']}, micro_batches={r['micro_batches']}, remat={r['remat']}, dtype={r['dtype']}",
             f"  batch {r['batch']}",
             f"  lower {r['lower_seconds']:.1f} s, compile {r['compile_seconds']:.1f} s"]
    s = r["state_bytes"]
    lines.append(f"  per chip: params {_gib(s['params'])}, optimizer {_gib(s['opt_state'])}, "
                 f"batch {_gib(r['batch_bytes'])}")
    if "memory" in r:
        m = r["memory"]
        lines.append(f"  HBM per chip: arguments {_gib(m['argument'])}, temporaries {_gib(m['temp'])}, outputs "
                     f"{_gib(m['output'])} (aliased {_gib(m['alias'])}), code {_gib(m['generated_code'])}")
    used = _gib(r["hbm_bytes"]) if "hbm_bytes" in r else "?"
    lines.append(f"  => {'FITS' if r['fits'] else 'DOES NOT FIT'}: {used} of {_gib(r['hbm_capacity_bytes'])}")
    if not r["fits"]:
        if r.get("error"):
            lines.append(f"  compiler: {r['error']}")
        lines += [f"    {a}" for a in r.get("largest_allocations", [])]
        lines.append("  knobs to try: " + "; ".join(r["knobs"]))
    lines.append(f"  replicated params: {100 * r['replicated_fraction']:.2f}% of elements"
                 + (f"; should be sharded: {r['replicated_params'][:3]}" if r["replicated_params"] else ""))
    if "memory" not in r:
        return "\n".join(lines)
    lines.append(f"  matmul FLOPs per chip: compiled {r['hlo_matmul_flops']:.3e} (HLO, {r['loops']} loops with "
                 f"trip counts), model {r['model_flops']:.3e}, ratio {r['flops_ratio']:.3f}; "
                 f"cost_analysis() {r['cost_analysis_flops']:.3e}")
    if r["unknown_trip_counts"]:
        lines.append(f"  WARNING: loops with unknown trip count (counted once): {r['unknown_trip_counts']}")
    if r.get("unknown_kernels"):
        lines.append(f"  WARNING: custom kernels without a FLOP count (not counted): {r['unknown_kernels'][:5]}")
    lines.append("  matmul dtype mix (share of FLOPs): "
                 + ", ".join(f"{k} {100 * v:.1f}%" for k, v in r["dtype_mix"].items()))
    for mix, sources in r.get("matmul_sources", {}).items():
        lines += [f"    {mix} {100 * share:.2f}%: {name[-110:]}" for name, share in sources.items()]
    coll = ", ".join(f"{k} x{c['count']:.0f} {_gib(c['bytes'])}" for k, c in r["collectives"].items())
    lines.append(f"  collectives per step: {coll or 'none'}; total {_gib(r['collective_bytes'])} "
                 f"(2 x param bytes = {_gib(2 * r['param_bytes_total'])})")
    for array, c in list(r.get("largest_collectives", {}).items())[:5]:
        lines.append(f"    {_gib(c['bytes'])} in {c['count']:.0f} x {array[:100]}")
    rf = r["roofline"]
    lines.append(f"  roofline: compute {rf['compute_s'] * 1e3:.1f} ms, HBM traffic {_gib(r['hbm_traffic_bytes'])} "
                 f"-> {rf['memory_s'] * 1e3:.1f} ms; step >= {rf['step_s_lower_bound'] * 1e3:.1f} ms, "
                 f"<= {rf['pairs_per_s_upper_bound']:.0f} pairs/s, MFU <= {100 * rf['mfu_upper_bound']:.1f}%")
    return "\n".join(lines)
