"""The training batch schema: for each task, the step's keys and their shapes and dtypes.

The one definition that the pipeline (which emits these keys), the train step, jclip-compile and the benches
read. A global batch holds the keys of the run's tasks (config.loss):

  image_text:   image              float32 (B_img, S, S, 3)   CLIP-normalised pixels, NHWC
                image_caption      int32   (B_img, L_img)     token ids, right-padded with the pad id
  text_pair:    text_query         int32   (B_txt, L_txt)
                text_passage       int32   (B_txt, L_txt)
  text_triplet: triplet_query      int32   (B_txt, L_txt)
                triplet_positive   int32   (B_txt, L_txt)
                triplet_negatives  int32   (B_txt, K, L_txt)  K = NEGATIVES_PER_QUERY hard negatives per query

B are global batch sizes (each process holds B / processes rows), S the image size, L the max lengths.
The pipeline adds STATS_KEY: per-process values that never reach the step (decode_failures; source_counts
for an image-text mixture; text_dataset, the index of the text dataset drawn for this step).
"""

from __future__ import annotations

NEGATIVES_PER_QUERY = 7  # paper §4.1: one positive and seven hard negatives per triplet

TASK_KEYS = {
    "image_text": ("image", "image_caption"),
    "text_pair": ("text_query", "text_passage"),
    "text_triplet": ("triplet_query", "triplet_positive", "triplet_negatives"),
}
IMAGE_KEYS = ("image",)
TEXT_KEYS = tuple(k for keys in TASK_KEYS.values() for k in keys if k not in IMAGE_KEYS)
STATS_KEY = "stats"

# Where each key comes from: the image-text records' fields, and for a text task the kind of records
# (records.KINDS) its config.data.text_dir holds and their fields.
IMAGE_TEXT_FIELDS = {"image": "image", "image_caption": "text"}
TEXT_TASK_RECORDS = {
    "text_pair": ("text_pair", {"text_query": "query", "text_passage": "positive"}),
    "text_triplet": ("triplet", {"triplet_query": "query", "triplet_positive": "positive",
                                 "triplet_negatives": "negatives"}),
}


def text_task_of_kind(kind: str) -> str:
    """The text task a text_dir of record kind `kind` feeds ('text_pair' -> 'text_pair', 'triplet' ->
    'text_triplet')."""
    for task, (record_kind, _) in TEXT_TASK_RECORDS.items():
        if record_kind == kind:
            return task
    raise ValueError(f"{kind!r} records feed no text task; known: "
                     f"{sorted(kind for kind, _ in TEXT_TASK_RECORDS.values())}")


def keys(tasks) -> tuple[str, ...]:
    """The batch keys of `tasks`, sorted."""
    return tuple(sorted(k for t in tasks for k in TASK_KEYS[t]))


def tasks_of(batch_keys) -> tuple[str, ...]:
    """The tasks whose keys are all in `batch_keys` (in TASK_KEYS order)."""
    present = set(batch_keys)
    return tuple(t for t, ks in TASK_KEYS.items() if set(ks) <= present)


def shapes(tasks, *, image_batch: int, image_size: int, image_max_length: int, text_batch: int,
           text_max_length: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """{key: (global shape, dtype name)} of the batch of `tasks`."""
    out = {}
    if "image_text" in tasks:
        out["image"] = ((image_batch, image_size, image_size, 3), "float32")
        out["image_caption"] = ((image_batch, image_max_length), "int32")
    for task in ("text_pair", "text_triplet"):
        if task in tasks:
            out.update({k: ((text_batch, text_max_length), "int32") for k in TASK_KEYS[task]})
    if "text_triplet" in tasks:
        out["triplet_negatives"] = ((text_batch, NEGATIVES_PER_QUERY, text_max_length), "int32")
    return out
