"""The evaluation tasks of jclip-eval and of the trainer's `config.evals.tasks`, on local data.

A task is a spec dict (the same keys as jclip-eval's options):

    {"type": "image_text", "data": "dataset_coco.json", "images": "coco/", "split": "test"}  # Karpathy JSON
    {"type": "image_text", "data": "data/eval/flickr30k_test"}               # a jclip-prepare'd directory
    {"type": "zeroshot", "data": "imagenet/val", "classnames": "names.txt", "templates": "templates.txt"}
    {"type": "beir", "data": "scifact/", "split": "test"}                    # corpus/queries.jsonl, qrels/
    {"type": "sts", "data": "sts-test.tsv"}                                  # sentence1, sentence2, score

`load(spec)` reads the data once (a bad spec or file fails naming it; a bad record is skipped and
counted); `evaluate(data, ctx, params, dims)` embeds it and returns {dim: {metric: value}} for each
Matryoshka dimension (None: the full embedding), with the embeddings computed once for all dims.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from jclip_jax.data import records, sources
from jclip_jax.evals import metrics
from jclip_jax.inference import normalize_rows

TASK_TYPES = ("image_text", "zeroshot", "beir", "sts")
SPEC_KEYS = {
    "image_text": ("data", "images", "split"),
    "zeroshot": ("data", "classnames", "templates"),
    "beir": ("data", "split", "query_prefix", "document_prefix"),
    "sts": ("data", "prefix"),
}
DEFAULT_TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_templates.txt")


@dataclasses.dataclass
class Context:
    """What evaluate() needs besides the params: the embedder, the tokenizer and the model's sizes."""

    embedder: object  # evals.embed.Embedder
    tokenizer: object  # jclip_jax.tokenizer.TextTokenizer
    image_size: int
    max_length: int


def check_spec(spec: Mapping, where: str = "task") -> dict:
    """A task spec with its keys and paths checked (before any compute); errors name `where` and the key."""
    spec = {k: v for k, v in dict(spec).items() if v not in (None, "")}
    kind = spec.get("type")
    if kind not in TASK_TYPES:
        raise ValueError(f"{where}: type={kind!r}; known task types: {', '.join(TASK_TYPES)}")
    unknown = sorted(set(spec) - {"type", *SPEC_KEYS[kind]})
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} for type {kind!r} (known: {', '.join(SPEC_KEYS[kind])})")
    if "data" not in spec:
        raise ValueError(f"{where}: no data path (data=...)")
    for key in ("data", "images", "classnames", "templates"):
        if key in spec and not os.path.exists(spec[key]):
            raise FileNotFoundError(f"{where}: {key}={spec[key]!r} does not exist")
    if kind == "image_text" and os.path.isfile(spec["data"]) and "images" not in spec:
        raise ValueError(f"{where}: data={spec['data']!r} is an annotation file; give the image folder (images=...)")
    return spec


def load(spec: Mapping, where: str = "task") -> dict:
    """Read a task's data (see the module docstring) into a dict with its type and counts."""
    spec = check_spec(spec, where)
    reader = {"image_text": _load_image_text, "zeroshot": _load_zeroshot, "beir": _load_beir, "sts": _load_sts}
    data = reader[spec["type"]](spec)
    data["type"] = spec["type"]
    return data


def evaluate(data: dict, ctx: Context, params, dims: Sequence[int | None] = (None,)) -> dict:
    """{dim: {metric: value}} for each Matryoshka dim (None: full), plus data["counts"] in each."""
    run = {"image_text": _eval_image_text, "zeroshot": _eval_zeroshot, "beir": _eval_beir, "sts": _eval_sts}
    ctx.embedder.decode_failures = []
    out = run[data["type"]](data, ctx, params, dims)
    for d in dims:
        out[d].update(data["counts"])
        if data["type"] in ("image_text", "zeroshot"):
            out[d]["decode_failures"] = len(ctx.embedder.decode_failures)
    return out


# ------------------------------------------------------------------------------------- image <-> text


def _load_image_text(spec: dict) -> dict:
    """Images (paths or encoded bytes) and every caption with the index of its image."""
    images, captions, owner, skipped = [], [], [], 0
    if os.path.isdir(spec["data"]):  # a prepared image_text directory
        import grain

        manifest = records.read_manifest(spec["data"], kind="image_text")
        paths = [p for entry in manifest["datasets"].values() for p in entry["paths"]]
        items = map(_image_text_record, grain.sources.ArrayRecordDataSource(paths))
    else:  # a Karpathy split file (or COCO captions JSON) + the image folder
        # the reader jclip-prepare --format coco uses: (image file, captions) or Skip
        coco = sources.SourceSpec(format="coco", split=spec.get("split", "test"))
        items = [item if isinstance(item, sources.Skip) else (os.path.join(spec["images"], item[0]), item[1])
                 for item in sources.coco_items(spec["data"], coco)]
    for item in items:
        if isinstance(item, sources.Skip):
            skipped += 1
            continue
        image, caps = item
        for c in caps:
            captions.append(c)
            owner.append(len(images))
        images.append(image)
    if not images:
        raise ValueError(f"{spec['data']!r}: no images with captions (split={spec.get('split', 'test')!r}?)")
    return {"images": images, "captions": captions, "owner": np.asarray(owner, np.int64),
            "counts": {"images": len(images), "captions": len(captions), "skipped_records": skipped}}


def _image_text_record(data: bytes) -> tuple[bytes, list[str]] | sources.Skip:
    """(image bytes, captions) of a prepared record, or Skip for a damaged one (counted, not fatal)."""
    try:
        record = records.decode(data)
        return record["image"], list(record["captions"])
    except (ValueError, KeyError, TypeError) as e:  # msgpack's and the schema's errors are ValueErrors
        return sources.Skip("corrupt_record", f"{type(e).__name__}: {e}")


def _eval_image_text(data, ctx: Context, params, dims):
    image_feats, kept = ctx.embedder.images(params, data["images"], ctx.image_size)
    text_feats = ctx.embedder.texts(params, ctx.tokenizer, data["captions"], ctx.max_length, desc="captions")
    # an image that failed to decode takes its captions with it; the rest are re-indexed
    new_index = np.full(len(data["images"]), -1, np.int64)
    new_index[kept] = np.arange(len(kept))
    owner = new_index[data["owner"]]
    keep_text = owner >= 0
    return {d: metrics.image_text_retrieval(normalize_rows(image_feats, d), normalize_rows(text_feats[keep_text], d),
                                            owner[keep_text]) for d in dims}


# ------------------------------------------------------------------------------ zero-shot classification


def read_lines(path: str) -> list[str]:
    """Non-empty lines of a text file, '#' lines skipped."""
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip() and not line.lstrip().startswith("#")]


def read_templates(path: str) -> list[str]:
    """Prompt templates, one per line, with '{c}' (or '{}') where the class name goes."""
    templates = [t.replace("{}", "{c}") for t in read_lines(path)]
    bad = [t for t in templates if "{c}" not in t]
    if bad or not templates:
        raise ValueError(f"templates file {path!r}: every line needs a {{c}} placeholder; bad: {bad[:3]}")
    return templates


def _load_zeroshot(spec: dict) -> dict:
    root = spec["data"]
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not folders:
        raise ValueError(f"{root!r}: no class folders")
    if "classnames" in spec:  # one name per line in sorted-folder order, or "folder<TAB>name" lines
        lines = read_lines(spec["classnames"])
        if all("\t" in line for line in lines):
            table = dict(line.split("\t", 1) for line in lines)
            missing = [f for f in folders if f not in table]
            if missing:
                raise ValueError(f"classnames {spec['classnames']!r}: no name for folder(s) {missing[:5]}")
            names = [table[f] for f in folders]
        elif len(lines) == len(folders):
            names = lines
        else:
            raise ValueError(f"classnames {spec['classnames']!r} has {len(lines)} names for {len(folders)} class "
                             f"folders in {root!r}")
    else:
        names = [f.replace("_", " ") for f in folders]
    images, labels = [], []
    for label, folder in enumerate(folders):
        for entry in sorted(os.scandir(os.path.join(root, folder)), key=lambda e: e.name):
            if entry.is_file() and entry.name.rsplit(".", 1)[-1].lower() in (*sources.IMAGE_EXTENSIONS, "bmp", "gif"):
                images.append(entry.path)
                labels.append(label)
    if not images:
        raise ValueError(f"{root!r}: no image files in the class folders")
    return {"images": images, "labels": np.asarray(labels, np.int64), "classnames": names,
            "templates": read_templates(spec.get("templates", DEFAULT_TEMPLATES)),
            "counts": {"images": len(images), "classes": len(folders)}}


def class_weights(text_feats: np.ndarray, num_classes: int, dim: int | None) -> np.ndarray:
    """Per-class prompt features (C*T, D) -> (C, d): each prompt normalised (after Matryoshka truncation),
    averaged over the templates, normalised again (CLIP's zero-shot classifier)."""
    per_prompt = normalize_rows(text_feats, dim)
    return normalize_rows(per_prompt.reshape(num_classes, -1, per_prompt.shape[-1]).mean(axis=1))


def _eval_zeroshot(data, ctx: Context, params, dims):
    prompts = [t.replace("{c}", name) for name in data["classnames"] for t in data["templates"]]
    text_feats = ctx.embedder.texts(params, ctx.tokenizer, prompts, ctx.max_length, desc="prompts")
    image_feats, kept = ctx.embedder.images(params, data["images"], ctx.image_size)
    labels = data["labels"][kept]
    out = {}
    for d in dims:
        logits = normalize_rows(image_feats, d) @ class_weights(text_feats, len(data["classnames"]), d).T
        out[d] = metrics.classification(logits, labels, ks=(1, 5))
    return out


# --------------------------------------------------------------------------------- BEIR text retrieval


def _read_jsonl(path: str, fields: Sequence[str]) -> tuple[list[dict], int]:
    rows, bad = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if not isinstance(row, dict) or any(not isinstance(row.get(k), str) for k in fields):
                bad += 1
                continue
            rows.append(row)
    return rows, bad


def _load_beir(spec: dict) -> dict:
    root, split = spec["data"], spec.get("split", "test")
    paths = {"corpus": os.path.join(root, "corpus.jsonl"), "queries": os.path.join(root, "queries.jsonl"),
             "qrels": os.path.join(root, "qrels", f"{split}.tsv")}
    for name, path in paths.items():
        if not os.path.exists(path):
            raise FileNotFoundError(f"BEIR directory {root!r}: no {os.path.relpath(path, root)} ({name})")
    corpus, bad_docs = _read_jsonl(paths["corpus"], ("_id", "text"))
    queries, bad_queries = _read_jsonl(paths["queries"], ("_id", "text"))
    doc_index = {d["_id"]: i for i, d in enumerate(corpus)}
    query_text = {q["_id"]: q["text"] for q in queries}
    qrels: dict[str, dict[int, int]] = {}
    bad_qrels = unknown_docs = unknown_queries = 0
    with open(paths["qrels"], encoding="utf-8", newline="") as f:
        for row in csv.reader(f, delimiter="\t"):
            if len(row) < 3 or row[0] == "query-id":
                bad_qrels += row[:1] != ["query-id"]
                continue
            qid, did, score = row[0], row[1], row[2]
            try:
                grade = int(float(score))
            except ValueError:
                bad_qrels += 1
                continue
            if qid not in query_text:
                unknown_queries += 1
                continue
            if did not in doc_index:  # relevant but not in the corpus: still in recall's denominator
                unknown_docs += 1
                doc = -1 - unknown_docs
            else:
                doc = doc_index[did]
            qrels.setdefault(qid, {})[doc] = grade
    if not qrels:
        raise ValueError(f"{paths['qrels']!r}: no judgements for queries in queries.jsonl")
    qids = list(qrels)  # BEIR evaluates the queries that have qrels in the split
    docs = [(d.get("title") or "").strip() + " " + d["text"] if d.get("title") else d["text"] for d in corpus]
    return {"queries": [spec.get("query_prefix", "") + query_text[q] for q in qids],
            "documents": [spec.get("document_prefix", "") + d for d in docs],
            "qrels": [qrels[q] for q in qids],
            "counts": {"queries": len(qids), "documents": len(docs), "skipped_records": bad_docs + bad_queries
                       + bad_qrels + unknown_queries, "qrels_unknown_documents": unknown_docs}}


def _eval_beir(data, ctx: Context, params, dims):
    q = ctx.embedder.texts(params, ctx.tokenizer, data["queries"], ctx.max_length, desc="queries")
    docs = ctx.embedder.texts(params, ctx.tokenizer, data["documents"], ctx.max_length, desc="documents")
    return {d: metrics.text_retrieval(metrics.top_k(normalize_rows(q, d), normalize_rows(docs, d), 100), data["qrels"])
            for d in dims}


# ------------------------------------------------------------------------------------------------- STS


def _load_sts(spec: dict) -> dict:
    path = spec["data"]
    if path.endswith(".jsonl"):
        rows, bad = _read_jsonl(path, ("sentence1", "sentence2"))
    elif path.endswith((".tsv", ".csv")):
        with open(path, encoding="utf-8", newline="") as f:
            rows, bad = list(csv.DictReader(f, delimiter="\t" if path.endswith(".tsv") else ",")), 0
        missing = {"sentence1", "sentence2", "score"} - set(rows[0] if rows else {})
        if missing:
            raise ValueError(f"STS file {path!r}: no column(s) {sorted(missing)} in the header")
    else:
        raise ValueError(f"STS file {path!r}: expected .tsv, .csv or .jsonl")
    s1, s2, gold = [], [], []
    for row in rows:
        try:
            score = float(row["score"])
        except (KeyError, TypeError, ValueError):
            bad += 1
            continue
        if not row.get("sentence1") or not row.get("sentence2") or not np.isfinite(score):
            bad += 1
            continue
        prefix = spec.get("prefix", "")
        s1.append(prefix + row["sentence1"])
        s2.append(prefix + row["sentence2"])
        gold.append(score)
    if len(gold) < 2:
        raise ValueError(f"STS file {path!r}: fewer than 2 usable rows")
    return {"sentence1": s1, "sentence2": s2, "gold": np.asarray(gold), "counts": {"pairs": len(gold),
                                                                                  "skipped_records": bad}}


def _eval_sts(data, ctx: Context, params, dims):
    a = ctx.embedder.texts(params, ctx.tokenizer, data["sentence1"], ctx.max_length, desc="sentence1")
    b = ctx.embedder.texts(params, ctx.tokenizer, data["sentence2"], ctx.max_length, desc="sentence2")
    return {d: metrics.sts_spearman(normalize_rows(a, d), normalize_rows(b, d), data["gold"]) for d in dims}
