"""Readers for the formats users have. Each yields schema dicts (see records.py) or `Skip(reason)`.

Readers never raise on bad data: an unreadable image, a missing caption or a malformed line becomes a
`Skip` with a reason, which `jclip-prepare` counts. Only unusable arguments (no input files, a missing
annotation file) raise, with the path in the message.

Also here: `TfdsImageTextSource`, a grain data source over a tensorflow-datasets dataset prepared in
array_record format, which needs tfds but not TensorFlow.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import io
import json
import os
import tarfile
from collections.abc import Iterator, Sequence

from PIL import Image

from jclip_jax.data import records

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclasses.dataclass(frozen=True)
class Skip:
    reason: str  # short snake_case; becomes a key of the summary's "skipped" map
    detail: str = ""


def expand_inputs(patterns: str | Sequence[str]) -> list[str]:
    """Glob patterns (or plain paths) -> sorted file list; a pattern matching nothing is an error."""
    if isinstance(patterns, str):
        patterns = [patterns]
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise FileNotFoundError(f"no input files match {pattern!r}")
        paths.extend(matches)
    return paths


def image_problem(data: bytes) -> str | None:
    """None if `data` decodes as an image, else a description of why not.

    Decodes fully (truncated JPEGs only fail when the entropy-coded data runs out), but in JPEG draft
    mode, which decodes at 1/8 scale via the DCT and costs a fraction of a full decode.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (64, 64))
            img.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return f"{type(e).__name__}: {e}"
    return None


def _caption_from_json(data: bytes) -> str | None:
    try:
        meta = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(meta, dict):
        return None
    for field in ("caption", "text", "txt"):
        if isinstance(meta.get(field), str) and meta[field].strip():
            return meta[field]
    return None


def _webdataset_sample(key: str, files: dict[str, bytes], where: str) -> dict | Skip:
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
    if image_ext is None:
        return Skip("missing_image", f"{where}: {key}")
    caption = None
    if "txt" in files:
        caption = files["txt"].decode("utf-8", errors="replace").strip() or None
    if caption is None and "json" in files:
        caption = _caption_from_json(files["json"])
    if caption is None:
        return Skip("missing_caption", f"{where}: {key}")
    problem = image_problem(files[image_ext])
    if problem is not None:
        return Skip("unreadable_image", f"{where}: {key}.{image_ext}: {problem}")
    return {"key": key, "image": files[image_ext], "captions": [caption]}


def iter_webdataset(patterns: str | Sequence[str]) -> Iterator[dict | Skip]:
    """img2dataset / webdataset tars: members KEY.jpg|jpeg|png|webp with KEY.txt or KEY.json (caption).

    As in webdataset, KEY is the member path up to the first dot of its base name and the members of one
    sample are adjacent in the tar. A tar that is cut short yields what it has and a Skip("unreadable_tar").
    """
    for path in expand_inputs(patterns):
        key, files = None, {}
        try:
            with tarfile.open(path, "r|*") as tar:  # streaming: shards may be large
                for member in tar:
                    if not member.isfile():
                        continue
                    dirname, base = os.path.split(member.name)
                    if "." not in base:
                        continue
                    stem, ext = base.split(".", 1)
                    member_key = os.path.join(dirname, stem)
                    if member_key != key:
                        if key is not None:
                            yield _webdataset_sample(key, files, path)
                        key, files = member_key, {}
                    files[ext.lower()] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            yield Skip("unreadable_tar", f"{path}: {e}")
        if key is not None:
            yield _webdataset_sample(key, files, path)


def _image_file_record(image_root: str, file: str, captions: list[str]) -> dict | Skip:
    """An image_text record for an image file on disk, or the reason it is skipped."""
    path = os.path.join(image_root, file)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return Skip("missing_image", f"{path}: {e}")
    problem = image_problem(data)
    if problem is not None:
        return Skip("unreadable_image", f"{path}: {problem}")
    return {"key": file, "image": data, "captions": captions}


def _read_table(path: str) -> Iterator[dict | Skip]:
    """Rows of a CSV (with a header) or a JSONL file as dicts; bad JSON lines become Skips."""
    if path.endswith((".jsonl", ".json")):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    yield Skip("malformed_line", f"{path}:{lineno}: {e}")
                    continue
                if not isinstance(row, dict):
                    row = Skip("malformed_line", f"{path}:{lineno}: not a JSON object")
                yield row
    elif path.endswith((".csv", ".tsv")):
        with open(path, encoding="utf-8", newline="") as f:
            yield from csv.DictReader(f, delimiter="\t" if path.endswith(".tsv") else ",")
    else:
        raise ValueError(f"caption table {path!r}: expected a .csv, .tsv or .jsonl file")


def iter_folder(captions_file: str, image_root: str | None = None, file_column: str = "file",
                caption_column: str = "caption") -> Iterator[dict | Skip]:
    """A folder of images plus a CSV/JSONL table of (file, caption); files relative to `image_root`
    (default: the table's directory)."""
    if not os.path.exists(captions_file):
        raise FileNotFoundError(f"caption table {captions_file!r} not found")
    image_root = image_root or os.path.dirname(os.path.abspath(captions_file))
    for row in _read_table(captions_file):
        if isinstance(row, Skip):
            yield row
            continue
        file, caption = row.get(file_column), row.get(caption_column)
        if not isinstance(file, str) or not file:
            yield Skip("malformed_line", f"{captions_file}: row without {file_column!r}: {row!r:.80}")
            continue
        if not isinstance(caption, str) or not caption.strip():
            yield Skip("missing_caption", f"{captions_file}: {file}")
            continue
        yield _image_file_record(image_root, file, [caption])


def _coco_items(annotations: dict, path: str, split: str | None) -> Iterator[tuple[str, list[str]] | Skip]:
    """(image file, captions) from COCO captions JSON or a Karpathy split file (dataset_coco.json,
    dataset_flickr30k.json)."""
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
            if split is not None and image.get("split") != split:
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
        raise ValueError(f"{path!r} is neither COCO captions JSON (has 'annotations') nor a Karpathy split "
                         "file (has 'images' with 'sentences')")


def iter_coco(annotations_file: str, image_root: str, split: str | None = None) -> Iterator[dict | Skip]:
    """COCO / Flickr30k captions for evaluation sets: one record per image with all its captions.
    `split` ("train", "val", "test", "restval") selects images of a Karpathy split file."""
    if not os.path.exists(annotations_file):
        raise FileNotFoundError(f"annotation file {annotations_file!r} not found")
    with open(annotations_file, encoding="utf-8") as f:
        try:
            annotations = json.load(f)
        except ValueError as e:
            raise ValueError(f"annotation file {annotations_file!r} is not valid JSON: {e}") from e
    for item in _coco_items(annotations, annotations_file, split):
        if isinstance(item, Skip):
            yield item
            continue
        file, captions = item
        yield _image_file_record(image_root, file, captions)


def iter_text_jsonl(
    patterns: str | Sequence[str], kind: str, default_dataset: str = "default"
) -> Iterator[dict | Skip]:
    """JSONL text pairs {"query", "positive", "dataset"?} or triplets (plus "negatives": [7 strings]).
    A line without "dataset" goes to `default_dataset`."""
    for path in expand_inputs(patterns):
        for row in _read_table(path):
            if isinstance(row, Skip):
                yield row
                continue
            row = {"dataset": default_dataset, **row, "kind": kind}
            try:
                yield records.validate(row)
            except records.RecordError as e:
                reason = "bad_negatives" if "negatives" in str(e) else "malformed_record"
                yield Skip(reason, f"{path}: {e}")


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
