"""The scaling table (docs/scaling.md): each v1 (and v2) stage compiled for several TPU topologies with jclip-compile.

    python bench/scaling.py                                   # every stage x topology x remat, then the table
    python bench/scaling.py --stages 1 --topologies v5p:4x4x4,v5e:16x16 --remat on
    python bench/scaling.py --render                          # only rebuild docs/scaling.md from the JSONs
    python bench/scaling.py --stages 1 --topologies v5p:4x4x4 --extra mesh='(("data",8),("fsdp",8))' \
        --name fsdp8 --no-activation-constraints              # the FSDP before/after comparison

Each row is one `jclip-compile` run (a subprocess, so a crash or an over-HBM refusal is a row, not an
abort) writing `<out>/<name>.json`; the table is rendered from every JSON in `<out>`, so runs can be
added one at a time (a v1 compile takes 4-8 minutes on 2 cores). Nothing runs on a TPU.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPOLOGIES = ("v4:4x4x4", "v5e:16x16", "v5p:4x4x4", "v6e:8x8")  # v4-64, v5e-256, v5p-64, v6e-64
NAMES = {"v4:4x4x4": "v4-64", "v5e:16x16": "v5e-256", "v5p:4x4x4": "v5p-64", "v6e:8x8": "v6e-64",
         "v5e:2x2": "v5e-4"}
GIB = 1024**3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="v1", help="v1, v2 or v1,v2 (configs/jina_clip_<model>.py:stage=<N>)")
    p.add_argument("--stages", default="1,2,3")
    p.add_argument("--topologies", default=",".join(TOPOLOGIES))
    p.add_argument("--remat", default="on,off", help="on, off, dots (remat with the 'dots' policy)")
    p.add_argument("--extra", action="append", default=[], help="more --config.key=value overrides")
    p.add_argument("--name", default="", help="suffix for the run names (with --extra)")
    p.add_argument("--no-activation-constraints", action="store_true",
                   help="compile without the towers' activation sharding constraints (the 'before' of FSDP)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "scaling_runs"))
    p.add_argument("--doc", default=os.path.join(ROOT, "docs", "scaling.md"))
    p.add_argument("--render", action="store_true", help="only render the table from existing JSONs")
    p.add_argument("--reanalyze", action="store_true",
                   help="recompute every JSON's HLO-derived fields from its saved .hlo.txt (after a change to "
                        "compile/hlo.py), then render; no compile")
    p.add_argument("--timeout", type=int, default=3600)
    return p.parse_args(argv)


REMAT = {"on": ["--config.model.remat=True"], "off": ["--config.model.remat=False"],
         "dots": ["--config.model.remat=True", "--config.model.remat_policy=dots"]}


def run_one(model: str, stage: int, topology: str, remat: str, args) -> str:
    name = f"{model}_stage{stage}_{NAMES.get(topology, topology.replace(':', '_'))}_remat-{remat}"
    name += f"_{args.name}" if args.name else ""
    out = os.path.join(args.out, name + ".json")
    cmd = [sys.executable, "-m", "jclip_jax.compile.cli", f"--config={ROOT}/configs/jina_clip_{model}.py:stage={stage}",
           f"--topology={topology}", f"--json={out}", f"--hlo={out[:-5]}.hlo.txt", *REMAT[remat],
           *[f"--config.{e}" for e in args.extra]]
    env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1", JAX_PLATFORMS="cpu")
    if args.no_activation_constraints:
        cmd.append("--config.activation_constraints=False")
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=args.timeout)
    print(f"{name}: exit {proc.returncode} in {time.time() - t0:.0f} s", flush=True)
    print("\n".join(ln for ln in proc.stdout.splitlines() if ln.startswith(("jclip-compile", "  "))), flush=True)
    if proc.returncode not in (0, 1):
        print(proc.stderr[-2000:], file=sys.stderr)
    return out


def reanalyze(out_dir: str) -> None:
    """Rerun compile/hlo.py on each run's saved HLO and update its JSON (memory figures are the compiler's
    and stay as they are)."""
    from jclip_jax.compile import hlo, report

    for path in sorted(glob.glob(os.path.join(out_dir, "*.json"))):
        hlo_path = path[:-5] + ".hlo.txt"
        with open(path) as f:
            r = json.load(f)
        if "memory" not in r or not os.path.exists(hlo_path):
            continue
        batch = r["batch"]
        r.setdefault("pairs_per_step", batch["image"][0] + (batch.get("text_query") or batch["triplet_query"])[0])
        with open(hlo_path) as f:
            r.update(report.hlo_fields(hlo.analyze(f.read()), r))
        with open(path, "w") as f:
            json.dump(r, f, indent=2, default=float)
        print(f"{os.path.basename(path)}: collectives {r['collective_bytes'] / GIB:.2f} GiB, "
              f"FLOPs ratio {r['flops_ratio']:.3f}", flush=True)


def render(out_dir: str) -> str:
    rows = []
    for path in sorted(glob.glob(os.path.join(out_dir, "*.json"))):
        with open(path) as f:
            r = json.load(f)
        name = os.path.basename(path)[:-5]
        mem = f"{r['hbm_bytes'] / GIB:.1f} / {r['hbm_capacity_bytes'] / GIB:.0f}" if "hbm_bytes" in r else "?"
        ratio = f"{r['flops_ratio']:.2f}" if "flops_ratio" in r else "-"
        bound = r.get("roofline", {})
        step = f"{1e3 * bound['step_s_lower_bound']:.1f}" if bound else "-"
        pairs = f"{bound['pairs_per_s_upper_bound']:,.0f}" if bound else "-"
        mfu = f"{100 * bound['mfu_upper_bound']:.0f}%" if bound else "-"
        coll = f"{r['collective_bytes'] / GIB:.1f}" if "collective_bytes" in r else "-"
        mix = r.get("dtype_mix", {})
        bf16 = f"{100 * sum(v for k, v in mix.items() if k.startswith('bf16 x bf16')):.0f}%" if mix else "-"
        rows.append(f"| {name} | {r['chip']} x{r['chips']} | {r['mesh']} | {r['micro_batches']} | "
                    f"{'yes' if r['fits'] else '**no**'} | {mem} | {ratio} | {bf16} | {coll} | {step} | {pairs} | "
                    f"{mfu} | {r.get('compile_seconds', 0):.0f} |")
    header = ("| run | chips | mesh | micro-batches | fits | HBM per chip GiB (used / capacity) | compiled / model "
              "FLOPs | bf16 x bf16 FLOPs | collectives GiB / step | step >= ms | pairs/s <= | MFU <= | compile s |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    return header + "\n" + "\n".join(rows)


def render_summary(out_dir: str) -> str:
    """One cell per (model stage, topology): the cheapest remat-on run that fits (pure data parallel before
    FSDP, fewer micro-batches first), else the closest miss. Variants (_batch4096, _flash, _at-<commit>)
    are left out."""
    cells: dict = {}
    for path in glob.glob(os.path.join(out_dir, "*.json")):
        name = os.path.basename(path)[:-5]
        parts = name.split("_", 4)  # model, stage<N>, topology, remat-<r>[, suffix]
        variant = len(parts) == 5 and any(t.startswith(("at-", "batch", "flash")) for t in parts[4].split("_"))
        if len(parts) < 4 or parts[3] != "remat-on" or variant:
            continue
        with open(path) as f:
            r = json.load(f)
        key = (not r["fits"], r["micro_batches"], r["mesh"].get("fsdp", 1) > 1, r.get("hbm_bytes", float("inf")))
        cell = (parts[0], parts[1]), parts[2]
        if cell not in cells or key < cells[cell][0]:
            cells[cell] = (key, r)
    topologies = [NAMES[t] for t in TOPOLOGIES]
    lines = ["| model, stage | " + " | ".join(topologies) + " |", "|---" * (len(topologies) + 1) + "|"]
    for model, stage in sorted({c[0] for c in cells}):
        row = []
        for topo in topologies:
            if ((model, stage), topo) not in cells:
                row.append("-")
                continue
            r = cells[(model, stage), topo][1]
            mem = f"{r['hbm_bytes'] / GIB:.1f} / {r['hbm_capacity_bytes'] / GIB:.0f} GiB"
            how = [f"fsdp {r['mesh']['fsdp']}"] if r["mesh"].get("fsdp", 1) > 1 else []
            how += [f"micro_batches {r['micro_batches']}"] if r["micro_batches"] > 1 else []
            text = f"{mem}, {r['flops_ratio']:.2f}" if r["fits"] else f"**does not fit**: {mem}"
            row.append(text + (f" ({', '.join(how)})" if how else ""))
        lines.append(f"| {model} {stage.replace('stage', 'stage ')} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _replace_between(doc: str, marker: str, text: str) -> str:
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    head, _, rest = doc.partition(begin)
    _, _, tail = rest.partition(end)
    return f"{head}{begin}\n{text}\n{end}{tail}"


def write_doc(args) -> None:
    table, summary = render(args.out), render_summary(args.out)
    with open(args.doc) as f:
        doc = f.read()
    doc = _replace_between(_replace_between(doc, "scaling-table", table), "scaling-summary", summary)
    with open(args.doc, "w") as f:
        f.write(doc)
    print(summary + "\n\n" + table)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.reanalyze:
        reanalyze(args.out)
    elif not args.render:
        for model in args.models.split(","):
            for stage in [int(s) for s in args.stages.split(",")]:
                for topology in args.topologies.split(","):
                    for remat in args.remat.split(","):
                        run_one(model, stage, topology, remat, args)
    write_doc(args)


if __name__ == "__main__":
    main()
