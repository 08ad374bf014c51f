"""The one training format: ArrayRecord shards of msgpack records, plus a `manifest.json` per directory.

A prepared directory holds records of one kind, grouped by source dataset (text-pair batches are drawn from
one dataset at a time, so each dataset gets its own shards):

    DIR/manifest.json                       {"format": "jclip-records", "version": 1, "kind": ...,
                                             "datasets": {name: {"files": [...], "count": n}},
                                             "written": N, "skipped": {reason: count}}
    DIR/<dataset>-00000.array_record        msgpack maps, schema below

Record schemas (every record carries "v", the schema version, and "kind"):

    image_text: {"key": str, "image": bytes (the original encoded file), "captions": [str, ...],
                 "url": str (optional: img2dataset's source URL)}
    text_pair:  {"query": str, "positive": str, "dataset": str}
    triplet:    {"query": str, "positive": str, "negatives": [str] * 7, "dataset": str}

Images stay encoded (JPEG/PNG/WebP bytes): decoding happens in the input pipeline's workers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping

import msgpack
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from jclip_jax.data.batch import NEGATIVES_PER_QUERY

FORMAT_NAME = "jclip-records"
VERSION = 1
KINDS = ("image_text", "text_pair", "triplet")
MANIFEST = "manifest.json"
# group_size:1 makes every record its own chunk, so random access (grain shuffles globally) reads one
# record instead of decompressing a group of 65536.
_WRITER_OPTIONS = "group_size:1"


class RecordError(ValueError):
    """A record that does not follow the schema; the message names the field and value."""


def _require_str(record: Mapping, field: str, kind: str) -> str:
    value = record.get(field)
    if not isinstance(value, str) or not value.strip():
        raise RecordError(f"{kind} record: field {field!r} must be a non-empty string, got {value!r:.80}")
    return value


def validate(record: Mapping) -> dict:
    """Checks a record against the schema of its "kind"; returns it with "v" set. Raises RecordError."""
    kind = record.get("kind")
    if kind not in KINDS:
        raise RecordError(f"record kind must be one of {KINDS}, got {kind!r}")
    if kind == "image_text":
        if not isinstance(record.get("image"), bytes) or not record["image"]:
            raise RecordError("image_text record: field 'image' must be non-empty encoded image bytes")
        captions = record.get("captions")
        if (not isinstance(captions, list | tuple) or not captions
                or not all(isinstance(c, str) and c.strip() for c in captions)):
            raise RecordError(f"image_text record: 'captions' must be a non-empty list of strings, "
                              f"got {captions!r:.80}")
        out = {"key": str(record.get("key", "")), "image": record["image"], "captions": list(captions)}
        if record.get("url"):
            out["url"] = str(record["url"])
    else:
        out = {
            "query": _require_str(record, "query", kind),
            "positive": _require_str(record, "positive", kind),
            "dataset": _require_str(record, "dataset", kind),
        }
        if kind == "triplet":
            negatives = record.get("negatives")
            if (not isinstance(negatives, list | tuple) or len(negatives) != NEGATIVES_PER_QUERY
                    or not all(isinstance(n, str) and n.strip() for n in negatives)):
                raise RecordError(f"triplet record: 'negatives' must be a list of {NEGATIVES_PER_QUERY} "
                                  f"non-empty strings, got {negatives!r:.120}")
            out["negatives"] = list(negatives)
    return {"v": VERSION, "kind": kind, **out}


def encode(record: Mapping) -> bytes:
    """Validated record -> msgpack bytes."""
    return msgpack.packb(validate(record), use_bin_type=True)


def decode(data: bytes) -> dict:
    """msgpack bytes -> record dict. Refuses records written by a newer schema version."""
    record = msgpack.unpackb(data, raw=False)
    if not isinstance(record, dict) or "v" not in record:
        raise RecordError(f"not a jclip record (no version field): {data[:40]!r}")
    if record["v"] > VERSION:
        raise RecordError(f"record schema version {record['v']} is newer than this code's {VERSION}")
    return record


def safe_name(name: str) -> str:
    """Dataset name -> file-name prefix, distinct for distinct names: a name that had to be changed
    ("web qa", "web/qa" -> "web_qa") gets a hash of the original ("web_qa~1b2c3d4e"), which no unchanged
    name can equal ("~" is never kept)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    if safe == name and name:
        return name
    return f"{safe}~{hashlib.sha1(name.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"


def shard_file_name(dataset: str, part: int) -> str:
    return f"{safe_name(dataset)}-{part:05d}.array_record"


def count_records(path: str | os.PathLike) -> int:
    """Number of records in an ArrayRecord file (reads its footer/index, not the records)."""
    reader = ArrayRecordReader(os.fspath(path))
    try:
        return reader.num_records()
    finally:
        reader.close()


def write_json_atomic(path, value) -> None:
    """Writes JSON so that readers see the old file or the whole new one, never a partial one
    (local: a temporary file renamed over it; gs://: object writes are atomic)."""
    from etils import epath

    path = epath.Path(path)
    text = json.dumps(value, indent=1)
    if "://" in os.fspath(path):
        path.write_text(text)
        return
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_manifest(output_dir, kind: str, datasets: Mapping[str, Mapping], written: int,
                   skipped: Mapping[str, int], **extra) -> None:
    """DIR/manifest.json; `datasets` maps name -> {"files": [...], "count": n}. File names must be unique."""
    files = [f for entry in datasets.values() for f in entry["files"]]
    if len(set(files)) != len(files):
        raise ValueError(f"two datasets would share a shard file in {os.fspath(output_dir)!r}: {files}")
    manifest = {"format": FORMAT_NAME, "version": VERSION, "kind": kind,
                "datasets": {k: dict(datasets[k]) for k in sorted(datasets)},
                "written": written, "skipped": dict(sorted(skipped.items())), **extra}
    write_json_atomic(os.path.join(os.fspath(output_dir), MANIFEST), manifest)


class RecordWriter:
    """Writes validated records of one kind into sharded ArrayRecord files and a manifest.

    Use as a context manager; `write(record)` routes by `record["dataset"]` (or `dataset` for image_text).
    `file_name(dataset, part)` names the shards (default `<dataset>-<part>.array_record`); with
    `manifest=False` the writer leaves the manifest to its caller (jclip-prepare assembles one from the
    parts of many writers) and `files` lists {dataset: [[file, count], ...]}.
    """

    def __init__(self, output_dir: str | os.PathLike, kind: str, records_per_shard: int = 5000,
                 file_name=shard_file_name, manifest: bool = True):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if records_per_shard < 1:
            raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
        self.output_dir = os.fspath(output_dir)
        self.kind = kind
        self.records_per_shard = records_per_shard
        self._file_name, self._manifest = file_name, manifest
        os.makedirs(self.output_dir, exist_ok=True)
        if manifest and os.path.exists(os.path.join(self.output_dir, MANIFEST)):
            raise FileExistsError(f"{self.output_dir!r} already holds a prepared dataset ({MANIFEST}); "
                                  "choose an empty output directory")
        self._open: dict[str, tuple[ArrayRecordWriter, int]] = {}  # dataset -> (writer, records in shard)
        self.files: dict[str, list[list]] = {}  # dataset -> [[file name, records], ...]
        self.skipped: dict[str, int] = {}
        self._summary: dict | None = None

    @property
    def written(self) -> int:
        return sum(n for files in self.files.values() for _, n in files)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def write(self, record: Mapping, dataset: str = "default") -> None:
        data = encode({**record, "kind": self.kind})
        name = record.get("dataset", dataset) if self.kind != "image_text" else dataset
        writer, n = self._open.get(name, (None, 0))
        if writer is None or n >= self.records_per_shard:
            if writer is not None:
                writer.close()
            files = self.files.setdefault(name, [])
            fname = self._file_name(name, len(files))
            files.append([fname, 0])
            writer, n = ArrayRecordWriter(os.path.join(self.output_dir, fname), _WRITER_OPTIONS), 0
        writer.write(data)
        self._open[name] = (writer, n + 1)
        self.files[name][-1][1] += 1

    def close(self) -> dict:
        """Closes the shards, writes the manifest, returns the summary {"written": N, "skipped": {...}}.
        Idempotent: later calls return the same summary."""
        if self._summary is not None:
            return self._summary
        for writer, _ in self._open.values():
            writer.close()
        self._open = {}
        if self._manifest:
            datasets = {k: {"files": [f for f, _ in v], "count": sum(n for _, n in v)} for k, v in self.files.items()}
            write_manifest(self.output_dir, self.kind, datasets, self.written, self.skipped)
        self._summary = {"written": self.written, "skipped": dict(sorted(self.skipped.items()))}
        return self._summary

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:  # no manifest for a half-written directory: it must not look prepared
            for writer, _n in self._open.values():
                writer.close()
            self._open = {}


def read_manifest(directory: str | os.PathLike, kind: str | None = None) -> dict:
    """Loads DIR/manifest.json (local or gs://), checking format, version and (optionally) kind; paths become
    absolute."""
    from etils import epath

    path = epath.Path(directory) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{os.fspath(path)!r} not found: prepare the data with `jclip-prepare` first")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{os.fspath(path)!r}: format {manifest.get('format')!r} is not {FORMAT_NAME!r}")
    if manifest.get("version", 0) > VERSION:
        raise ValueError(f"{os.fspath(path)!r}: version {manifest['version']} is newer than this code's {VERSION}")
    if kind is not None and manifest.get("kind") != kind:
        raise ValueError(f"{os.fspath(path)!r} holds {manifest.get('kind')!r} records, expected {kind!r}")
    for entry in manifest["datasets"].values():
        entry["paths"] = [os.path.join(os.fspath(directory), f) for f in entry["files"]]
    return manifest
