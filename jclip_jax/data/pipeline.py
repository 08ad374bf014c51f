"""grain input pipeline: per-process, checkpointable batches of image-caption pairs and text pairs/triplets.

Every batch is a pure function of (seed, step): the datasets are grain `MapDataset`s (random access,
shuffled per epoch, repeated forever) so an iterator's state is a few indices and a resumed pipeline yields
exactly the batches an uninterrupted one would. Every process reads its rows of the same global batches
(`ProcessRows`), so the global batch at a step is the same for any process count (while no image fails to
decode: a process fills a dropped record's place from its own next rows).

    it = train_iterator(config)                  # grain DatasetIterator, one per process
    batch = next(it)                             # the step's keys (data/batch.py) + "stats", local numpy
    stats = batch.pop("stats")                   # decode_failures (, source_counts): this process's counts
    batch = make_global_batch(batch, mesh)       # jax.Arrays sharded over the mesh's data axes
    # checkpoint: ocp.args.Composite(..., data=grain.checkpoint.CheckpointSave(it)) / CheckpointRestore(it)

Local batch contents (B_img, B_txt = global batch sizes / process count; L = max lengths; S = image size):
    image_text: image float32 (B_img, S, S, 3), CLIP-normalised, NHWC
                text int32 (B_img, L_img), right-padded with the tokenizer's pad id
                decode_failures int32 () records dropped while filling this batch (undecodable image)
                source_counts int32 (n,) examples from each source of a mixture (image_text_mixture only)
    text (pairs):    query int32 (B_txt, L_txt), positive int32 (B_txt, L_txt), dataset int32 ()
    text (triplets): as pairs + negatives int32 (B_txt, 7, L_txt)
`dataset` indexes the text directory's datasets (sorted by name); all processes draw the same one at a step.
"""

from __future__ import annotations

import dataclasses
import io
import os
import sys
import threading
from collections.abc import Mapping, Sequence

import grain
import jax
import numpy as np
from PIL import Image

from jclip_jax import preprocess
from jclip_jax.data import batch as batch_schema
from jclip_jax.data import records
from jclip_jax.tokenizer import TextTokenizer


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What `train_iterator` needs. Batch sizes are global (summed over processes)."""

    image_text_dir: str                    # prepared image_text directory, or "tfds:NAME:SPLIT"
    tokenizer_path: str                    # tokenizer.json (HF tokenizers) or sentencepiece .model
    image_batch_size: int
    text_dir: str | None = None            # prepared text_pair (stages 1-2) or triplet (stage 3) directory
    text_batch_size: int = 0
    image_size: int = 224
    image_max_length: int = 77             # caption tokens (77 in stage 1, 512 later)
    text_max_length: int = 77
    crop_scale: tuple[float, float] = (0.9, 1.0)  # RandomResizedCrop area range (open_clip's default)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    random_crop: bool = True               # False: the evaluation resize + centre crop
    text_weights: Mapping[str, float] | None = None  # per text dataset; None: proportional to size
    text_buckets: Sequence[int] | None = None  # pad text batches to buckets (single process only)
    seed: int = 0
    worker_count: int = 0                  # image decoding processes (0: in this process)
    text_worker_count: int = 0             # tokenising processes for the text batches
    worker_buffer_size: int = 2            # batches each worker keeps ready
    read_threads: int = 4                  # threads per worker (PIL releases the GIL while decoding)
    tfds_data_dir: str | None = None
    # ((prepared image_text dir, weight), ...): a per-example weighted mixture, replacing image_text_dir
    image_text_mixture: tuple[tuple[str, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class DecodeFailure:
    """Stands in for a record whose image could not be decoded; the batcher drops and counts it."""

    reason: str


def process_share() -> tuple[int, int]:
    """(this process's index, process count), from jax like grain's ShardByJaxProcess."""
    options = grain.sharding.ShardByJaxProcess()
    return options.shard_index, options.shard_count


# ------------------------------------------------------------------------------------------------ images


class ImageTextTransform(grain.transforms.RandomMap):
    """msgpack image_text record -> {"image": uint8 (S, S, 3), "text": int32 (L,)} or DecodeFailure.

    The batcher normalises (CLIP mean/std) straight into the float32 batch: a crop travels between threads
    as uint8 and is never copied again as float32.

    Training: RandomResizedCrop + a random caption of the record. Evaluation (random_crop=False):
    shortest-side bicubic resize + centre crop, first caption. Runs in grain workers: picklable, and the
    tokenizer is loaded lazily in each process.
    """

    def __init__(self, tokenizer_path: str, max_length: int, image_size: int, random_crop: bool,
                 crop_scale=(0.9, 1.0), crop_ratio=(3 / 4, 4 / 3)):
        self.tokenizer_path, self.max_length, self.image_size = tokenizer_path, max_length, image_size
        self.random_crop, self.crop_scale, self.crop_ratio = random_crop, tuple(crop_scale), tuple(crop_ratio)
        self._tokenizer = None

    def __getstate__(self):
        return {**self.__dict__, "_tokenizer": None}

    def image(self, data: bytes, rng: np.random.Generator | None) -> np.ndarray:
        """Encoded image -> uint8 (S, S, 3) crop."""
        with Image.open(io.BytesIO(data)) as img:
            img = preprocess.to_rgb(img)
        if self.random_crop:
            img = preprocess.random_resized_crop(img, self.image_size, rng, self.crop_scale, self.crop_ratio)
        else:
            img = preprocess.resize_shortest_side(img, self.image_size)
            img = preprocess.center_crop(img, self.image_size)
        return np.asarray(img, dtype=np.uint8)

    def random_map(self, data: bytes | tuple[int, bytes], rng: np.random.Generator):
        if self._tokenizer is None:
            self._tokenizer = TextTokenizer(self.tokenizer_path)
        source, data = data if isinstance(data, tuple) else (None, data)  # (source index, record) in a mixture
        try:
            record = records.decode(data)
            pixels = self.image(record["image"], rng)
        except Exception as e:  # a corrupt image must cost one record, never the run
            return DecodeFailure(f"{type(e).__name__}: {e}")
        captions = record["captions"]
        caption = captions[int(rng.integers(len(captions)))] if self.random_crop else captions[0]
        ids = self._tokenizer([caption], self.max_length, buckets=None)[0]
        out = {"image": pixels, "text": ids}
        if source is not None:
            out["source"] = source
        return out


# Records in a row that may fail to decode before a batch gives up: 0.95 ** 1000 ~ 5e-23, so only a dataset that
# is (almost) entirely undecodable stops the run, with a message, instead of spinning forever.
MAX_CONSECUTIVE_FAILURES = 1000


class _BatchDroppingFailures(grain.IterDataset):
    """Stacks `batch_size` good elements, skipping DecodeFailures and counting them in the batch; images are
    normalised into the float32 batch here.

    grain's `filter` + `batch` would drop them silently; the count must reach the metrics. The iterator keeps
    nothing between batches, so its checkpoint state is its parent's.
    """

    def __init__(self, parent: grain.IterDataset, batch_size: int, drop_remainder: bool = True,
                 num_sources: int = 0, what: str = "image_text data",
                 max_consecutive_failures: int = MAX_CONSECUTIVE_FAILURES):
        super().__init__(parent)
        self.batch_size, self.drop_remainder, self.num_sources = batch_size, drop_remainder, num_sources
        self.what, self.max_consecutive_failures = what, max_consecutive_failures
        self.shared_memory = False

    def enable_shared_memory_output(self) -> None:
        """Build image batches in shared memory, so a worker hands them over without another copy
        (grain's SupportsSharedMemoryOutput, as its own batch transform does)."""
        self.shared_memory = True

    def __iter__(self):
        return _BatchDroppingFailuresIterator(self._parent.__iter__(), self.batch_size, self.drop_remainder,
                                              self.shared_memory, self.num_sources, self.what,
                                              self.max_consecutive_failures)


class _BatchDroppingFailuresIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, batch_size: int, drop_remainder: bool,
                 shared_memory: bool, num_sources: int = 0, what: str = "image_text data",
                 max_consecutive_failures: int = MAX_CONSECUTIVE_FAILURES):
        super().__init__(parent)
        self.batch_size, self.drop_remainder, self.shared_memory = batch_size, drop_remainder, shared_memory
        self.num_sources = num_sources
        self.what, self.max_consecutive_failures = what, max_consecutive_failures

    def __next__(self) -> dict:
        items, failures, in_a_row = [], 0, 0
        while len(items) < self.batch_size:
            try:
                element = next(self._parent)
            except StopIteration:
                if not items or self.drop_remainder:
                    raise
                break
            if isinstance(element, DecodeFailure):
                failures += 1
                in_a_row += 1
                if in_a_row >= self.max_consecutive_failures:  # an all-bad dataset must not spin forever
                    raise ValueError(
                        f"{self.what}: the last {in_a_row} records all failed to decode (this batch: {len(items)} "
                        f"of {self.batch_size} filled, {failures} failed; last error: "
                        f"{(element.reason.splitlines() or [''])[0]:.160})")
            else:
                items.append(element)
                in_a_row = 0
        shape = (len(items), *items[0]["image"].shape)
        if self.shared_memory:
            image = grain.multiprocessing.SharedMemoryArray(shape, np.float32)
        else:
            image = np.empty(shape, np.float32)
        for i, item in enumerate(items):
            preprocess.normalize_into(item["image"], image[i])
        batch = {"image": image, "text": np.stack([item["text"] for item in items]),
                 "decode_failures": np.int32(failures)}
        if self.num_sources:
            sources = [item["source"] for item in items]
            batch["source_counts"] = np.bincount(sources, minlength=self.num_sources).astype(np.int32)
        return batch

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


def _image_text_source(location: str, tfds_data_dir: str | None):
    if location.startswith("tfds:"):
        from jclip_jax.data.sources import TfdsImageTextSource

        _, name, split = location.split(":", 2)
        return TfdsImageTextSource(name, split, data_dir=tfds_data_dir)
    manifest = records.read_manifest(location, kind="image_text")
    paths = [p for entry in manifest["datasets"].values() for p in entry["paths"]]
    return grain.sources.ArrayRecordDataSource(paths)


class ProcessRows(grain.MapDataset):
    """Process `index`'s rows of every global batch: local element i is global element
    (i // b) * b * count + index * b + i % b, with b the local batch size.

    Every process reads the same globally shuffled (and augmented: random_map seeds by global index) stream,
    so the rows of all processes at step k, stacked in process order, are the single-process batch k: the
    global batch does not depend on the process count. (grain's ShardByJaxProcess slices the records
    instead, which gives every process count its own batches.) The tail of a finite stream is split the
    same way: the last global batch may leave later processes fewer rows or none.
    """

    def __init__(self, parent: grain.MapDataset, local_batch: int, share: tuple[int, int]):
        super().__init__(parent)
        self.local_batch, (self.index, self.count) = local_batch, share
        full, rest = divmod(len(parent), local_batch * self.count)
        self._length = full * local_batch + min(local_batch, max(0, rest - self.index * local_batch))

    def __len__(self) -> int:
        return self._length

    def _global_index(self, i: int) -> int:
        b = self.local_batch
        return (i // b) * b * self.count + self.index * b + i % b

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._global_index(index)]

    def _getitems(self, indices):
        return self._parent._getitems([self._global_index(i) for i in indices])

    def __str__(self) -> str:
        return f"ProcessRows(local_batch={self.local_batch}, share={self.index}/{self.count})"


class StratifiedSelectionMap(grain.transforms.DatasetSelectionMap):
    """Example k -> (source d, k's rank among the examples from d): a per-example weighted mixture.

    Each block of `block` consecutive examples holds every source's quota (weight * block, rounded by
    largest remainder) in a random order seeded by (seed, block number). So any index maps in O(1), with
    no replay of earlier draws (resume at step 60,000 of a 32k batch is instant and exact), and the
    realised mixture is within one example per block of the weights.
    """

    def __init__(self, weights: Sequence[float], seed: int, block: int = 65_536):
        weights = np.asarray(weights, np.float64)
        if weights.ndim != 1 or len(weights) == 0 or (weights <= 0).any():
            raise ValueError(f"mixture weights must be positive, got {weights.tolist()}")
        exact = weights / weights.sum() * block
        quotas = np.floor(exact).astype(np.int64)
        quotas[np.argsort(quotas - exact)[: block - quotas.sum()]] += 1  # largest remainders first
        if (quotas == 0).any():
            raise ValueError(f"mixture weights {weights.tolist()}: a source below 1/{block} of the mixture")
        self.quotas, self.seed, self.block = quotas, seed, block
        self._layout = np.repeat(np.arange(len(quotas)), quotas)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()  # grain's read threads share the cache

    def __getstate__(self):  # pickled into grain's worker processes: a lock does not travel
        return {**self.__dict__, "_lock": None, "_cache": {}}

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.Lock())

    def __len__(self) -> int:
        return sys.maxsize

    def _permuted(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, rank within the block) of each position of block b."""
        with self._lock:
            return self._permuted_locked(b)

    def _permuted_locked(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        if b not in self._cache:
            order = np.random.default_rng([self.seed, b]).permutation(self._layout)
            ranks = np.empty(self.block, np.int64)
            for d in range(len(self.quotas)):
                where = np.flatnonzero(order == d)
                ranks[where] = np.arange(len(where))
            if len(self._cache) >= 4:  # a few blocks: the read threads straddle a boundary at most
                self._cache.pop(next(iter(self._cache)))
            self._cache[b] = (order, ranks)
        return self._cache[b]

    def __getitem__(self, index: int) -> tuple[int, int]:
        b, r = divmod(index, self.block)
        order, ranks = self._permuted(b)
        d = int(order[r])
        return d, int(b * self.quotas[d] + ranks[r])


class _Tagged(grain.transforms.Map):
    """record -> (source index, record), so the batch can count the realised mixture."""

    def __init__(self, index: int):
        self.index = index

    def map(self, data: bytes) -> tuple[int, bytes]:
        return self.index, data


def image_text_source_names(config: DataConfig) -> list[str]:
    """Names of the mixture's sources, in the order of `source_counts` (their directories' base names)."""
    dirs = [d for d, _ in config.image_text_mixture]
    names = [os.path.basename(os.path.normpath(d)) or d for d in dirs]
    return names if len(set(names)) == len(names) else dirs


def image_text_dataset(config: DataConfig, share: tuple[int, int] | None = None,
                       repeat: bool = True) -> grain.IterDataset:
    """This process's image-text batches (see the module docstring), from `config.image_text_dir` or the
    weighted `config.image_text_mixture`."""
    share = share or process_share()
    batch_size = _local(config.image_batch_size, share[1], "image_batch_size")
    if config.image_text_mixture:
        if not repeat:
            raise ValueError("image_text_mixture is for training (repeat=True) only")
        per_source = []
        for i, (location, _) in enumerate(config.image_text_mixture):
            ds = grain.MapDataset.source(_image_text_source(location, config.tfds_data_dir))
            ds = ds.seed(config.seed + 104_729 * (i + 1))
            per_source.append(ds.shuffle().repeat().map(_Tagged(i)))
        selection = StratifiedSelectionMap([w for _, w in config.image_text_mixture], config.seed)
        ds = grain.MapDataset.select_from_datasets(per_source, selection).seed(config.seed)
    else:
        ds = grain.MapDataset.source(_image_text_source(config.image_text_dir, config.tfds_data_dir))
        ds = ds.seed(config.seed)
        if repeat:
            ds = ds.shuffle().repeat()  # shuffle before repeat: a new order every epoch
    ds = ds.random_map(ImageTextTransform(config.tokenizer_path, config.image_max_length, config.image_size,
                                          config.random_crop, config.crop_scale, config.crop_ratio))
    ds = ProcessRows(ds, batch_size, share)  # after random_map: augmentation seeded by global index
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                              prefetch_buffer_size=2 * batch_size))
    return _BatchDroppingFailures(ds, batch_size, drop_remainder=repeat,
                                  num_sources=len(config.image_text_mixture),
                                  what=f"image_text data {config.image_text_dir!r}")


# ------------------------------------------------------------------------------------------------- text


class RandomDatasetSelectionMap(grain.transforms.DatasetSelectionMap):
    """Step k -> (dataset d, k's rank among the steps that drew d): one dataset per batch, drawn at random
    with the given weights (paper §4.1).

    grain's `mix` interleaves datasets in fixed proportions; the paper draws at random. Draws come in blocks
    of `block` steps from a generator seeded by (seed, block number), so any step is found without
    replaying the stream; per-block counts are cached (a pure function of the seed, safe in any process).
    """

    def __init__(self, weights: Sequence[float], seed: int, block: int = 1024):
        weights = np.asarray(weights, np.float64)
        if weights.ndim != 1 or len(weights) == 0 or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"text dataset weights must be non-negative with a positive sum, got {weights}")
        self.probs, self.seed, self.block = weights / weights.sum(), seed, block
        self._counts_before = [np.zeros(len(weights), np.int64)]  # [b]: draws per dataset before block b
        self._last = (-1, None)

    def __len__(self) -> int:
        return sys.maxsize

    def _draws(self, b: int) -> np.ndarray:
        if self._last[0] != b:
            rng = np.random.default_rng([self.seed, b])
            self._last = (b, rng.choice(len(self.probs), self.block, p=self.probs))
        return self._last[1]

    def __getitem__(self, step: int) -> tuple[int, int]:
        b, r = divmod(step, self.block)
        while len(self._counts_before) <= b:
            n = len(self._counts_before) - 1
            counts = np.bincount(self._draws(n), minlength=len(self.probs))
            self._counts_before.append(self._counts_before[-1] + counts)
        draws = self._draws(b)
        d = int(draws[r])
        return d, int(self._counts_before[b][d] + np.count_nonzero(draws[:r] == d))


class TokenizeTextBatch(grain.transforms.Map):
    """list of text_pair/triplet records -> int32 arrays: query, positive (B, L)[, negatives (B, 7, L)]."""

    def __init__(self, tokenizer_path: str, max_length: int, dataset_index: int, buckets=None):
        self.tokenizer_path, self.max_length = tokenizer_path, max_length
        self.dataset_index, self.buckets = dataset_index, buckets
        self._tokenizer = None

    def __getstate__(self):
        return {**self.__dict__, "_tokenizer": None}

    def map(self, batch: list[bytes]) -> dict:
        if self._tokenizer is None:
            self._tokenizer = TextTokenizer(self.tokenizer_path)
        rows = [records.decode(data) for data in batch]
        fields = ["query", "positive"] + (["negatives"] if "negatives" in rows[0] else [])
        texts = {f: [text for row in rows for text in ([row[f]] if f != "negatives" else row[f])]
                 for f in fields}
        if self.buckets:  # one length for the whole batch: every field shares the longest's bucket
            all_ids = self._tokenizer(sum(texts.values(), []), self.max_length, self.buckets)
            splits = np.cumsum([len(t) for t in texts.values()])[:-1]
            ids = dict(zip(fields, np.split(all_ids, splits), strict=True))
        else:
            ids = {f: self._tokenizer(t, self.max_length, buckets=None) for f, t in texts.items()}
        out = {f: ids[f].reshape(len(rows), -1, ids[f].shape[-1]) if f == "negatives" else ids[f]
               for f in fields}
        out["dataset"] = np.int32(self.dataset_index)
        return out


def text_dataset_weights(manifest: dict, text_weights: Mapping[str, float] | None, text_dir: str) -> list[float]:
    """The sampling weight of each text dataset of a prepared directory (sorted by name): its record count,
    or config.data.text_weights, which must name every dataset (0 leaves one out) and no other."""
    names = sorted(manifest["datasets"])
    if text_weights is None:
        return [float(manifest["datasets"][n]["count"]) for n in names]
    unknown, unweighted = sorted(set(text_weights) - set(names)), [n for n in names if n not in text_weights]
    if unknown:
        raise ValueError(f"config.data.text_weights names {unknown}, not datasets of {text_dir!r} ({names})")
    if unweighted:
        raise ValueError(f"config.data.text_weights gives no weight to {unweighted} of {text_dir!r}: they would "
                         "never be sampled; weigh every dataset (0 leaves one out)")
    return [float(text_weights[n]) for n in names]


def text_dataset(config: DataConfig, share: tuple[int, int] | None = None) -> grain.IterDataset:
    """This process's text-pair or triplet batches: each batch from one dataset, drawn per step."""
    share = share or process_share()
    if config.text_buckets and share[1] > 1:
        raise ValueError("text_buckets with several processes would give processes different shapes at "
                         "the same step; use fixed-length padding (text_buckets=None)")
    batch_size = _local(config.text_batch_size, share[1], "text_batch_size")
    manifest = records.read_manifest(config.text_dir)
    if manifest["kind"] not in ("text_pair", "triplet"):
        raise ValueError(f"{config.text_dir!r} holds {manifest['kind']!r} records, not text pairs/triplets")
    names = sorted(manifest["datasets"])
    weights = text_dataset_weights(manifest, config.text_weights, config.text_dir)
    per_dataset = []
    for i, name in enumerate(names):
        ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(manifest["datasets"][name]["paths"]))
        ds = ds.seed(config.seed + 7919 * (i + 1)).shuffle().repeat()
        ds = ProcessRows(ds, batch_size, share).batch(batch_size, drop_remainder=True, batch_fn=list)
        per_dataset.append(ds.map(TokenizeTextBatch(config.tokenizer_path, config.text_max_length, i,
                                                    config.text_buckets)))
    ds = grain.MapDataset.select_from_datasets(per_dataset, RandomDatasetSelectionMap(weights, config.seed))
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))


# ---------------------------------------------------------------------------------------------- together


def _local(global_size: int, process_count: int, name: str) -> int:
    if global_size < 1 or global_size % process_count:
        raise ValueError(f"{name}={global_size} must be a positive multiple of the {process_count} processes")
    return global_size // process_count


def with_workers(ds: grain.IterDataset, worker_count: int, buffer_size: int = 2) -> grain.IterDataset:
    """Runs `ds` (decoding, batching included) in `worker_count` grain processes; 0: in this process."""
    if worker_count <= 0:
        return ds
    # grain's worker processes read an absl flag; outside absl.app.run the flags are unparsed (grain #1355).
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    if isinstance(ds, _BatchDroppingFailures):  # grain enables this itself only for 2+ workers
        ds.enable_shared_memory_output()
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                       per_worker_buffer_size=buffer_size))


def train_dataset(config: DataConfig, share: tuple[int, int] | None = None) -> grain.IterDataset:
    """This process's training batches, with the step's keys (data/batch.py) and their STATS_KEY counters:
    image-text keys, and a text task's keys when config.text_dir is set (its record kind says which task)."""
    share = share or process_share()
    parts = [with_workers(image_text_dataset(config, share), config.worker_count, config.worker_buffer_size)]
    text_task = None
    if config.text_dir:
        text_task = batch_schema.text_task_of_kind(records.read_manifest(config.text_dir)["kind"])
        parts.append(with_workers(text_dataset(config, share), config.text_worker_count,
                                  config.worker_buffer_size))
    return grain.experimental.ZipIterDataset(parts).map(StepBatch(text_task))


class StepBatch(grain.transforms.Map):
    """(image-text batch[, text batch]) from ZipIterDataset -> the step's keys plus STATS_KEY counters."""

    def __init__(self, text_task: str | None):
        self.text_task = text_task

    def map(self, parts: tuple) -> dict:
        image_text = parts[0]
        out = {key: image_text[field] for key, field in batch_schema.IMAGE_TEXT_FIELDS.items()}
        out[batch_schema.STATS_KEY] = {k: image_text[k] for k in ("decode_failures", "source_counts")
                                       if k in image_text}
        if self.text_task:
            _, fields = batch_schema.TEXT_TASK_RECORDS[self.text_task]
            out.update({key: parts[1][field] for key, field in fields.items()})
            out[batch_schema.STATS_KEY]["text_dataset"] = parts[1]["dataset"]
        return out


def train_iterator(config: DataConfig, share: tuple[int, int] | None = None) -> grain.DatasetIterator:
    """The per-process training iterator; `get_state()`/`set_state()` or grain.checkpoint for resume.
    Close it (`it.close()`) when done if it has worker processes."""
    return iter(train_dataset(config, share))


def make_global_batch(batch, mesh: jax.sharding.Mesh, batch_axes: str | Sequence[str] = "data"):
    """Local numpy batch (nested dict) -> global jax.Arrays, the leading axis sharded over `batch_axes`.
    Scalars (the STATS_KEY counters) stay per-process numpy values."""
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(batch_axes))

    def to_global(x):
        if np.ndim(x) == 0:
            return x
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree.map(to_global, batch)
