"""Readers for the formats users have. Each yields schema dicts (see records.py) or `Skip(reason)`.

Readers never raise on bad data: an unreadable image, a missing caption, a malformed or non-UTF-8 line
becomes a `Skip` with a reason and the file:line, which `jclip-prepare` counts. Only unusable inputs raise
(`InputError`, one line naming the file): no file matches a pattern, a table without the named columns, an
empty or non-tar `.tar`, a missing annotation file.

`jclip-prepare` converts in units (`plan_units`): a whole tar, or a block of rows of a table, so that
workers and machines can share the inputs and a rerun can skip what is done. `iter_unit` reads one.
Paths may be local or `gs://...` (etils epath).

Also here: `TfdsImageTextSource`, a grain data source over a tensorflow-datasets dataset prepared in
array_record format, which needs tfds but not TensorFlow.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import io
import itertools
import json
import os
import tarfile
from collections.abc import Iterator, Sequence

from etils import epath
from PIL import Image

from jclip_jax import preprocess
from jclip_jax.data import records

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
FORMATS = ("webdataset", "folder", "coco", "text_pair", "triplet")


class InputError(ValueError):
    """An input that cannot be converted at all; the message is one line naming the file."""


@dataclasses.dataclass(frozen=True)
class Skip:
    reason: str  # short snake_case; becomes a key of the summary's "skipped" map
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class ImageOptions:
    min_size: int = 0              # skip images whose shorter side is smaller (0: keep all)
    resize_shorter_side: int = 0   # re-encode (JPEG) images whose shorter side is larger (0: keep the bytes)
    jpeg_quality: int = 95


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """What to read and how: everything but the input paths."""

    format: str                    # one of FORMATS
    image_root: str | None = None  # folder/coco: image paths are relative to it (folder: default the table's dir)
    file_column: str = "file"      # folder: the table's image-path column
    caption_column: str = "caption"
    split: str | None = None       # coco: Karpathy split
    default_dataset: str = "default"  # text: name for lines without a "dataset" field
    image: ImageOptions = ImageOptions()


def _is_remote(path: str) -> bool:
    return "://" in path


def expand_inputs(patterns: str | Sequence[str]) -> list[str]:
    """Glob patterns (or plain paths, local or gs://) -> sorted file list; a pattern matching nothing is an
    error."""
    if isinstance(patterns, str):
        patterns = [patterns]
    paths = []
    for pattern in patterns:
        if _is_remote(pattern):
            first_glob = min((pattern.find(c) for c in "*?[" if c in pattern), default=-1)
            if first_glob < 0:
                matches = [pattern] if epath.Path(pattern).exists() else []
            else:
                root, rest = pattern[:first_glob].rsplit("/", 1)
                matches = sorted(os.fspath(p) for p in epath.Path(root).glob(rest + pattern[first_glob:]))
        else:
            matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise InputError(f"no input files match {pattern!r}")
        paths.extend(matches)
    return paths


# ------------------------------------------------------------------------------------------------ images


def prepare_image(data: bytes, options: ImageOptions = ImageOptions()) -> bytes | Skip:
    """The bytes to store for an encoded image, or the Skip that says why not.

    Without resizing the original bytes are kept after a check decode in JPEG draft mode (1/8 scale via
    the DCT; truncated JPEGs only fail when the entropy-coded data runs out, so the decode is complete).
    With `resize_shorter_side` an image whose shorter side is larger is resized (bicubic) and re-encoded as
    JPEG, as img2dataset does at download time.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if options.min_size and min(width, height) < options.min_size:
                return Skip("image_too_small", f"{width}x{height}, shorter side < {options.min_size}")
            side = options.resize_shorter_side
            if not side or min(width, height) <= side:
                img.draft("RGB", (64, 64))
                img.load()
                return data
            scale = side / min(width, height)
            target = (max(side, round(width * scale)), max(side, round(height * scale)))
            img.draft("RGB", target)  # JPEG: decode at the smallest DCT scale still >= target
            rgb = preprocess.to_rgb(img).resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return Skip("unreadable_image", f"{type(e).__name__}: {e}")
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=options.jpeg_quality)
    return out.getvalue()


def _image_record(data: bytes, where: str, options: ImageOptions, **fields) -> dict | Skip:
    image = prepare_image(data, options)
    if isinstance(image, Skip):
        return Skip(image.reason, f"{where}: {image.detail}")
    return {**fields, "image": image}


def _image_file_record(image_root: str, file: str, captions: list[str], options: ImageOptions) -> dict | Skip:
    """An image_text record for an image file (local or gs://), or the reason it is skipped."""
    path = os.path.join(image_root, file)
    try:
        data = epath.Path(path).read_bytes()
    except OSError as e:
        return Skip("missing_image", f"{path}: {e}")
    return _image_record(data, path, options, key=file, captions=captions)


# ----------------------------------------------------------------------------------------------- tables


def _json_lines(path: str) -> Iterator[dict | Skip]:
    with epath.Path(path).open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 BOM, as Windows editors write
                raw = raw[3:]
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield Skip("malformed_line", f"{path}:{lineno}: not UTF-8 (byte {raw[e.start]:#04x} at "
                                             f"column {e.start + 1})")
                continue
            except ValueError as e:
                yield Skip("malformed_line", f"{path}:{lineno}: {e}")
                continue
            yield row if isinstance(row, dict) else Skip("malformed_line", f"{path}:{lineno}: not a JSON object")


def _not_utf8(field: str) -> bool:
    try:
        field.encode("utf-8")
    except UnicodeEncodeError:  # a surrogate escape: the file had a byte that is not UTF-8
        return True
    return False


def _csv_rows(path: str) -> Iterator[list[str] | Skip]:
    """The header, then each data row of a CSV/TSV, or a Skip naming file:line for a row with a byte that
    is not UTF-8. A UTF-8 BOM (Excel) is dropped."""
    delimiter = "\t" if path.endswith(".tsv") else ","
    with epath.Path(path).open("rb") as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="")
        reader = csv.reader(text, delimiter=delimiter)
        try:
            for row in reader:
                if not row:
                    continue
                if any(_not_utf8(field) for field in row):
                    yield Skip("malformed_line", f"{path}:{reader.line_num}: not UTF-8")
                else:
                    yield row
        except csv.Error as e:
            yield Skip("malformed_line", f"{path}:{reader.line_num}: {e}")


def table_rows(path: str) -> Iterator[dict | Skip]:
    """Rows of a CSV/TSV (with a header) or JSONL file as dicts, one item per data row; malformed rows
    (bad JSON, bytes that are not UTF-8, a CSV row whose field count differs from the header's) are
    Skip("malformed_line") naming file:line."""
    if path.endswith((".jsonl", ".json")):
        yield from _json_lines(path)
    elif path.endswith((".csv", ".tsv")):
        rows = _csv_rows(path)
        header = next(rows, None)
        if header is None or isinstance(header, Skip):
            raise InputError(f"{path}: no readable header row")
        for i, row in enumerate(rows):
            if isinstance(row, Skip) or len(row) == len(header):
                yield row if isinstance(row, Skip) else dict(zip(header, row, strict=True))
            else:  # an unquoted comma in a caption: never truncate it silently
                yield Skip("malformed_line", f"{path}: data row {i + 1}: {len(row)} fields, the header has "
                                             f"{len(header)} (quote fields that contain the delimiter)")
    else:
        raise InputError(f"table {path!r}: expected a .csv, .tsv or .jsonl file")


def check_columns(path: str, columns: Sequence[str]) -> None:
    """Raises InputError naming the columns found if the table's header (CSV) or first JSON object lacks
    any of `columns` (a wrong --file-column/--caption-column would otherwise skip every row)."""
    if path.endswith((".csv", ".tsv")):
        header = next(_csv_rows(path), None)
        found = header if isinstance(header, list) else None
    else:
        found = next((list(row) for row in _json_lines(path) if not isinstance(row, Skip)), None)
    if found is None:
        raise InputError(f"{path}: no readable header row or JSON object")
    missing = [c for c in columns if c not in found]
    if missing:
        raise InputError(f"{path}: no column {', '.join(map(repr, missing))}; its columns are {found} "
                         "(choose with --file-column / --caption-column)")


# ------------------------------------------------------------------------------------------------ items
# Cheap per-row items (no image is read): planning counts them, a unit reads a slice of them.


def _folder_items(path: str, spec: SourceSpec) -> Iterator[tuple[str, list[str]] | Skip]:
    for row in table_rows(path):
        if isinstance(row, Skip):
            yield row
            continue
        file, caption = row.get(spec.file_column), row.get(spec.caption_column)
        if not isinstance(file, str) or not file:
            yield Skip("malformed_line", f"{path}: row without {spec.file_column!r}: {row!r:.80}")
        elif not isinstance(caption, str) or not caption.strip():
            yield Skip("missing_caption", f"{path}: {file}")
        else:
            yield file, [caption]


def coco_items(path: str, spec: SourceSpec) -> Iterator[tuple[str, list[str]] | Skip]:
    """(image file, captions) from COCO captions JSON or a Karpathy split file (dataset_coco.json,
    dataset_flickr30k.json)."""
    try:
        annotations = json.loads(epath.Path(path).read_bytes())
    except ValueError as e:
        raise InputError(f"annotation file {path!r} is not valid UTF-8 JSON: {e}") from None
    if not isinstance(annotations, dict):
        annotations = {}
    if "annotations" in annotations:  # COCO: images[{id, file_name}], annotations[{image_id, caption}]
        captions: dict[int, list[str]] = {}
        for ann in annotations["annotations"]:
            if isinstance(ann.get("caption"), str) and ann["caption"].strip():
                captions.setdefault(ann.get("image_id"), []).append(ann["caption"].strip())
        for image in annotations.get("images", []):
            if "file_name" not in image:
                yield Skip("malformed_record", f"{path}: image without file_name: {image!r:.80}")
            elif image.get("id") not in captions:
                yield Skip("missing_caption", f"{path}: {image['file_name']}")
            else:
                yield image["file_name"], captions[image["id"]]
    elif "images" in annotations:  # Karpathy: images[{filepath?, filename, split, sentences[{raw}]}]
        for image in annotations["images"]:
            if spec.split is not None and image.get("split") != spec.split:
                continue
            if "filename" not in image:
                yield Skip("malformed_record", f"{path}: image without filename: {image!r:.80}")
                continue
            sentences = [s.get("raw", "").strip() for s in image.get("sentences", []) if isinstance(s, dict)]
            sentences = [s for s in sentences if s]
            if not sentences:
                yield Skip("missing_caption", f"{path}: {image['filename']}")
                continue
            yield os.path.join(image.get("filepath", ""), image["filename"]), sentences
    else:
        raise InputError(f"{path!r} is neither COCO captions JSON (has 'annotations') nor a Karpathy split "
                         "file (has 'images' with 'sentences')")


def _text_items(path: str, spec: SourceSpec) -> Iterator[dict | Skip]:
    """JSONL text pairs {"query", "positive", "dataset"?} or triplets (plus "negatives": [7 strings])."""
    for row in table_rows(path):
        if isinstance(row, Skip):
            yield row
            continue
        try:
            yield records.validate({"dataset": spec.default_dataset, **row, "kind": spec.format})
        except records.RecordError as e:
            yield Skip("bad_negatives" if "negatives" in str(e) else "malformed_record", f"{path}: {e}")


_ITEMS = {"folder": _folder_items, "coco": coco_items, "text_pair": _text_items, "triplet": _text_items}


def _record_from_item(item, path: str, spec: SourceSpec) -> dict | Skip:
    if isinstance(item, Skip) or spec.format in ("text_pair", "triplet"):
        return item
    file, captions = item
    root = spec.image_root or (os.path.dirname(path) if _is_remote(path) else os.path.dirname(os.path.abspath(path)))
    return _image_file_record(root, file, captions, spec.image)


# ---------------------------------------------------------------------------------------------- webdataset


def _caption_from_json(meta: dict) -> str | None:
    for field in ("caption", "text", "txt"):
        if isinstance(meta.get(field), str) and meta[field].strip():
            return meta[field].strip()
    return None


def _webdataset_sample(key: str, files: dict[str, bytes], where: str, options: ImageOptions) -> dict | Skip:
    """img2dataset's sample: KEY.jpg + KEY.txt (caption) and/or KEY.json ({"caption", "key", "url", ...})."""
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
    if image_ext is None:
        return Skip("missing_image", f"{where}: {key}")
    meta, caption = {}, None
    if "json" in files:
        try:
            meta = json.loads(files["json"])
        except ValueError as e:  # UnicodeDecodeError included
            if "txt" not in files:
                return Skip("undecodable_caption", f"{where}: {key}.json: {e}")
        meta = meta if isinstance(meta, dict) else {}
    if "txt" in files:
        try:
            caption = files["txt"].decode("utf-8").strip() or None
        except UnicodeDecodeError as e:  # never replace bytes silently: the caption would be wrong
            return Skip("undecodable_caption", f"{where}: {key}.txt: {e}")
    caption = caption or _caption_from_json(meta)
    if caption is None:
        return Skip("missing_caption", f"{where}: {key}")
    fields = {"key": str(meta.get("key") or key), "captions": [caption]}
    if isinstance(meta.get("url"), str):
        fields["url"] = meta["url"]
    return _image_record(files[image_ext], f"{where}: {key}.{image_ext}", options, **fields)


def iter_tar(path: str, options: ImageOptions = ImageOptions()) -> Iterator[dict | Skip]:
    """One img2dataset / webdataset tar: members KEY.jpg|jpeg|png|webp with KEY.txt or KEY.json.

    As in webdataset, KEY is the member path up to the first dot of its base name and the members of one
    sample are adjacent in the tar. An empty file or one that is not a tar raises InputError; a tar cut
    short yields what it has and a Skip("unreadable_tar").
    """
    key, files, members = None, {}, 0
    try:
        with epath.Path(path).open("rb") as f:
            if not f.read(1):
                raise InputError(f"{path}: empty file, not a tar archive")
            f.seek(0)
            with tarfile.open(fileobj=f, mode="r|*") as tar:  # streaming: shards may be large
                for member in tar:
                    members += 1
                    if not member.isfile():
                        continue
                    dirname, base = os.path.split(member.name)
                    if "." not in base:
                        continue
                    stem, ext = base.split(".", 1)
                    member_key = os.path.join(dirname, stem)
                    if member_key != key:
                        if key is not None:
                            yield _webdataset_sample(key, files, path, options)
                        key, files = member_key, {}
                    files[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        if members == 0:
            raise InputError(f"{path}: not a tar archive ({e})") from None
        yield Skip("unreadable_tar", f"{path}: {e}")
    if key is not None:
        yield _webdataset_sample(key, files, path, options)


# ------------------------------------------------------------------------------------------------ units


def plan_units(spec: SourceSpec, paths: Sequence[str], rows_per_unit: int) -> list[tuple[str, int, int]]:
    """The units of work, in order: (path, first row, end row); a tar is one unit (-1, -1).

    Deterministic in (spec, paths, rows_per_unit), so every machine of a sharded run plans the same units.
    Tables are read once here (cheap: no image is opened) to count their rows and check their columns.
    """
    if spec.format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {spec.format!r}")
    units = []
    for path in paths:
        if spec.format == "webdataset":
            units.append((path, -1, -1))
            continue
        if spec.format == "folder":
            check_columns(path, (spec.file_column, spec.caption_column))
        n = sum(1 for _ in _ITEMS[spec.format](path, spec))
        units.extend((path, start, min(start + rows_per_unit, n)) for start in range(0, n, rows_per_unit))
    return units


def iter_unit(spec: SourceSpec, unit: Sequence) -> Iterator[dict | Skip]:
    """The records (or Skips) of one unit from plan_units."""
    path, start, end = unit
    if spec.format == "webdataset":
        yield from iter_tar(path, spec.image)
        return
    for item in itertools.islice(_ITEMS[spec.format](path, spec), start, end):
        yield _record_from_item(item, path, spec)


class TfdsImageTextSource:
    """grain data source over a tensorflow-datasets dataset prepared in array_record format.

    Yields msgpack image_text records (the same bytes an ArrayRecord shard holds), so the pipeline treats
    both alike. Images are not decoded by tfds (`SkipDecoding`): they stay the encoded bytes. Needs
    `tensorflow_datasets` (+ `importlib_resources`), not TensorFlow.
    """

    def __init__(self, name: str, split: str, data_dir: str | None = None, image_key: str = "image",
                 caption_key: str = "caption"):
        try:
            import tensorflow_datasets as tfds
        except ImportError as e:
            raise ImportError("reading tfds datasets needs `pip install tensorflow-datasets "
                              "importlib_resources` (TensorFlow itself is not needed)") from e
        self._args = (name, split, data_dir, image_key, caption_key)
        self.image_key, self.caption_key = image_key, caption_key
        not_prepared = (f"tfds dataset {name!r} (split {split!r}) is not prepared in array_record format "
                        f"under data_dir={data_dir!r}; prepare it first "
                        "(tfds build --file_format=array_record)")
        try:
            source = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                      decoders={image_key: tfds.decode.SkipDecoding()})
        except NotImplementedError as e:  # tfds's answer when it finds no array_record files
            raise FileNotFoundError(not_prepared) from e
        if isinstance(source, dict) and not source:  # ... or, without a split, a silent {}
            raise FileNotFoundError(not_prepared)
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> bytes:
        example = self._source[index]
        captions = example[self.caption_key]
        if isinstance(captions, bytes | str):
            captions = [captions]
        captions = [c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in captions]
        image = bytes(example[self.image_key])
        return records.encode({"kind": "image_text", "key": str(index), "image": image, "captions": captions})

    def __reduce__(self):  # grain workers are spawned: reopen the source there instead of pickling it
        return (TfdsImageTextSource, self._args)
