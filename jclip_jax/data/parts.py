"""Parallel, sharded, resumable conversion for `jclip-prepare`: units, part markers and the manifest.

The inputs are split into units (sources.plan_units: one tar, or a block of table rows). Every machine of
a sharded run plans the same units and converts those with `unit % num_shards == shard_index`, with
`workers` processes, into the same output directory:

    OUT/.prepare/plan.json                      the units and options (identical from every machine)
    OUT/<dataset>-<unit:06d>-<part:03d>.array_record    one writer per unit: no two writers share a file
    OUT/.prepare/parts/<unit:06d>.<run>.json    written after the unit's files are closed: its files with
                                                their record counts and sizes, and its skip counts
    OUT/manifest.json                           assembled from the part markers once every unit has one

A unit is done only when its marker exists and its files verify (present, same size, same record count);
anything else is partial and is redone from scratch on a rerun. The manifest is written last (atomically)
and only from verified markers, so a crash can never leave a manifest that names a partial file. Two
markers for one unit mean two writers converted it (e.g. two machines given the same --shard-index):
finalize refuses.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import re
import shutil
import socket
import sys
import tempfile
import uuid
from collections.abc import Sequence

from etils import epath
from tqdm import tqdm

from jclip_jax.data import records, sources

STATE_DIR = ".prepare"
_UNIT_FILE = re.compile(r"-(\d{6})-\d{3}\.array_record$")
_MARKER = re.compile(r"^(\d{6})\.([A-Za-z0-9_.-]+)\.json$")


class PrepareError(ValueError):
    """A part is missing or was written twice, or the output holds another preparation."""


class NothingWritten(PrepareError):
    """Every input record was skipped."""


def _path(output: str, *names: str) -> epath.Path:
    return epath.Path(output).joinpath(*names)


def _is_remote(output: str) -> bool:
    return "://" in os.fspath(output)


def unit_file_name(unit: int):
    """Shard names unique per (unit, part): `<dataset>-<unit:06d>-<part:03d>.array_record`."""
    return lambda dataset, part: f"{records.safe_name(dataset)}-{unit:06d}-{part:03d}.array_record"


@dataclasses.dataclass(frozen=True)
class Job:
    """Everything a worker needs to convert one unit (picklable)."""

    output: str
    kind: str
    spec: sources.SourceSpec
    records_per_shard: int
    run_id: str
    verbose: bool


# -------------------------------------------------------------------------------------------- the plan


def make_plan(kind: str, spec: sources.SourceSpec, units: Sequence, records_per_shard: int,
              rows_per_unit: int) -> dict:
    return {"kind": kind, "spec": dataclasses.asdict(spec), "records_per_shard": records_per_shard,
            "rows_per_unit": rows_per_unit, "units": [list(u) for u in units]}


def open_output(output: str, plan: dict) -> bool:
    """Creates OUT with its plan, or checks that OUT holds a preparation of the same plan (a resume or
    another shard). Returns True if this call created OUT."""
    plan_path = _path(output, STATE_DIR, "plan.json")
    if plan_path.exists():
        existing = json.loads(plan_path.read_text())
        if existing != plan:
            differing = sorted(k for k in set(plan) | set(existing) if plan.get(k) != existing.get(k))
            raise PrepareError(f"{output!r} holds a preparation of other inputs or options (differing: "
                               f"{', '.join(differing)}); rerun the original command or choose a new --output")
        return False
    if _path(output, records.MANIFEST).exists():
        raise PrepareError(f"{output!r} already holds a prepared dataset ({records.MANIFEST}); "
                           "choose an empty output directory")
    created = not epath.Path(output).exists()
    _path(output, STATE_DIR, "parts").mkdir(parents=True, exist_ok=True)
    records.write_json_atomic(plan_path, plan)
    return created


def read_plan(output: str) -> dict:
    plan_path = _path(output, STATE_DIR, "plan.json")
    if not plan_path.exists():
        raise PrepareError(f"{output!r} has no {STATE_DIR}/plan.json: it was not written by a (sharded) "
                           "jclip-prepare run")
    return json.loads(plan_path.read_text())


# ------------------------------------------------------------------------------------------- the units


def _markers(output: str) -> dict[int, list[epath.Path]]:
    """unit -> its marker files."""
    found: dict[int, list[epath.Path]] = {}
    directory = _path(output, STATE_DIR, "parts")
    if directory.exists():
        for p in directory.iterdir():
            match = _MARKER.match(p.name)
            if match:
                found.setdefault(int(match.group(1)), []).append(p)
    return found


def _load_marker(path: epath.Path) -> dict:
    return json.loads(path.read_text())


def verify(output: str, marker: dict) -> bool:
    """The unit's files are all there, whole: the sizes match and (local files) the record counts."""
    for files in marker["files"].values():
        for name, count, size in files:
            p = _path(output, name)
            if not p.exists() or p.stat().length != size:
                return False
            if not _is_remote(output) and records.count_records(p) != count:
                return False
    return True


def _unit_files(output: str) -> dict[int, list[epath.Path]]:
    """unit -> the shard files in OUT named for it (complete or not)."""
    found: dict[int, list[epath.Path]] = {}
    for p in epath.Path(output).iterdir():
        match = _UNIT_FILE.search(p.name)
        if match:
            found.setdefault(int(match.group(1)), []).append(p)
    return found


def convert_unit(job: Job, index: int, unit: Sequence) -> dict:
    """Converts one unit into its shards and writes its marker; returns the marker."""
    remote = _is_remote(job.output)
    local_dir = tempfile.mkdtemp(prefix="jclip-prepare-") if remote else job.output
    try:
        with records.RecordWriter(local_dir, job.kind, job.records_per_shard, file_name=unit_file_name(index),
                                  manifest=False) as writer:
            for item in sources.iter_unit(job.spec, unit):
                if isinstance(item, sources.Skip):
                    writer.skip(item.reason)
                    if job.verbose:
                        print(f"skipped ({item.reason}): {item.detail}", file=sys.stderr, flush=True)
                else:
                    writer.write(item, dataset=job.spec.default_dataset)
        files = {}
        for dataset, shards in writer.files.items():
            files[dataset] = []
            for name, count in shards:
                local = epath.Path(local_dir) / name
                if remote:
                    local.copy(_path(job.output, name), overwrite=True)
                files[dataset].append([name, count, local.stat().length])
    finally:
        if remote:
            shutil.rmtree(local_dir, ignore_errors=True)
    marker = {"unit": index, "input": list(unit), "run": job.run_id, "files": files,
              "written": writer.written, "skipped": writer.skipped}
    records.write_json_atomic(_path(job.output, STATE_DIR, "parts", f"{index:06d}.{job.run_id}.json"), marker)
    return marker


def _convert_unit_star(args):
    return convert_unit(*args)


# -------------------------------------------------------------------------------------------- finalize


def finalize(output: str) -> dict:
    """Assembles OUT/manifest.json from the part markers; returns {"written", "skipped"}.

    Raises PrepareError if a unit has no verified marker (missing or partial) or several (written twice)."""
    plan = read_plan(output)
    units = plan["units"]
    markers = _markers(output)
    twice = {u: sorted(p.name for p in ps) for u, ps in markers.items() if len(ps) > 1}
    if twice:
        u, names = next(iter(sorted(twice.items())))
        raise PrepareError(f"{len(twice)} unit(s) written twice, e.g. unit {u} ({units[u][0]}) by {names}: two "
                           f"jobs had the same --shard-index? Delete {STATE_DIR}/parts/{u:06d}.* for each and "
                           "rerun to redo them")
    loaded = {u: _load_marker(ps[0]) for u, ps in markers.items() if u < len(units)}
    missing = [u for u in range(len(units)) if u not in loaded or not verify(output, loaded[u])]
    if missing:
        shown = ", ".join(f"{u} ({units[u][0]})" for u in missing[:5])
        raise PrepareError(f"{len(missing)} of {len(units)} units are missing or partial in {output!r}: {shown}"
                           f"{' ...' if len(missing) > 5 else ''}; run (or rerun) the jclip-prepare part that "
                           "owns them")
    datasets: dict[str, dict] = {}
    skipped: dict[str, int] = {}
    for u in range(len(units)):
        for dataset, files in loaded[u]["files"].items():
            entry = datasets.setdefault(dataset, {"files": [], "count": 0})
            entry["files"].extend(name for name, _, _ in files)
            entry["count"] += sum(count for _, count, _ in files)
        for reason, n in loaded[u]["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    written = sum(e["count"] for e in datasets.values())
    if written == 0:
        raise NothingWritten(f"no record could be converted from the inputs of {output!r} (skipped: "
                           f"{dict(sorted(skipped.items()))}); see --verbose")
    records.write_manifest(output, plan["kind"], datasets, written, skipped, units=len(units))
    return {"written": written, "skipped": dict(sorted(skipped.items()))}


# ------------------------------------------------------------------------------------------------- run


def run(output: str, kind: str, spec: sources.SourceSpec, units: Sequence, *, records_per_shard: int,
        rows_per_unit: int, workers: int = 1, num_shards: int = 1, shard_index: int = 0,
        verbose: bool = False) -> dict:
    """Converts this shard's units (skipping verified ones), then finalizes if every unit is done.

    Returns the manifest summary {"written", "skipped"} once finalized, else this part's
    {"written", "skipped", "pending_units"}.
    """
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"--shard-index {shard_index} must lie in [0, --num-shards {num_shards})")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    created = open_output(output, make_plan(kind, spec, units, records_per_shard, rows_per_unit))
    try:
        return _run(output, kind, spec, units, records_per_shard, workers, num_shards, shard_index, verbose)
    except BaseException as e:
        nothing = isinstance(e, NothingWritten) or not _markers(output)
        if created and nothing and not _is_remote(output):
            shutil.rmtree(output, ignore_errors=True)  # nothing converted: leave no near-empty directory
        raise


def _run(output, kind, spec, units, records_per_shard, workers, num_shards, shard_index, verbose) -> dict:
    run_id = f"{re.sub(r'[^A-Za-z0-9_-]', '_', socket.gethostname())}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    job = Job(output, kind, spec, records_per_shard, run_id, verbose)
    markers, unit_files = _markers(output), _unit_files(output)
    done, todo = {}, []
    for u in range(shard_index, len(units), num_shards):
        if len(markers.get(u, ())) == 1:
            marker = _load_marker(markers[u][0])
            if verify(output, marker):
                done[u] = marker
                continue
        todo.append(u)
    if todo:  # an old manifest would name files about to be redone
        _path(output, records.MANIFEST).unlink(missing_ok=True)
    for u in todo:  # partial (or written twice): markers first, so it stops counting as done, then its shards
        for p in markers.get(u, []) + unit_files.get(u, []):
            p.unlink(missing_ok=True)
    tasks = [(job, u, units[u]) for u in todo]
    bar = tqdm(total=len(todo), desc=f"{kind} -> {output}", unit=" units", file=sys.stderr)
    if workers == 1 or len(tasks) <= 1:
        results = map(_convert_unit_star, tasks)
        pool = None
    else:  # spawn: the parent may hold threads (tqdm's monitor), which fork would copy mid-state
        pool = multiprocessing.get_context("spawn").Pool(min(workers, len(tasks)))
        results = pool.imap_unordered(_convert_unit_star, tasks)
    try:
        for marker in results:
            done[marker["unit"]] = marker
            bar.update()
            bar.set_postfix(written=sum(m["written"] for m in done.values()), refresh=False)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    all_done = set(_markers(output)) >= set(range(len(units)))
    if all_done:
        return finalize(output)
    skipped: dict[str, int] = {}
    for m in done.values():
        for reason, n in m["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    return {"written": sum(m["written"] for m in done.values()), "skipped": dict(sorted(skipped.items())),
            "pending_units": len(units) - len(_markers(output))}
