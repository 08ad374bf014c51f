"""grain pipeline: hand-computed preprocessing, decode failures dropped and counted, dataset-per-batch
sampling, per-process shares of one global batch, exact resume (in-process and with worker processes + orbax)."""

import io

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from jclip_jax import preprocess
from jclip_jax.data import batch as batch_schema
from jclip_jax.data import pipeline, records
from jclip_jax.evals import embedder, tasks
from jclip_jax.tokenizer import TextTokenizer

DATASETS = ("alpha", "beta", "gamma")
WORDS = [*DATASETS] + [f"w{i}" for i in range(64)]
VOCAB = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}  # [CLS]=2, [SEP]=3
# spec §1.4: OpenAI CLIP mean / std
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def write_tokenizer(path):
    """BERT-style WordPiece over a vocabulary written here, so every id below is known by hand."""
    tokenizer = Tokenizer(models.WordPiece(VOCAB, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer.save(str(path))


def png(colour, size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def colour_of(i):
    return (10 * i, 255 - 10 * i, 7)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_tokenizer(root / "tokenizer.json")
    with records.RecordWriter(root / "images", "image_text", records_per_shard=3) as writer:
        for i in range(7):  # record i: uniform colour_of(i), caption "w{i}"
            writer.write({"key": str(i), "image": png(colour_of(i)), "captions": [f"w{i}"]})
    with records.RecordWriter(root / "corrupt", "image_text") as writer:
        for i in range(7):
            image = b"\xff\xd8 not really a jpeg" if i == 1 else png(colour_of(i))
            writer.write({"key": str(i), "image": image, "captions": [f"w{i}"]})
    with records.RecordWriter(root / "pairs", "text_pair") as writer:
        for name in DATASETS:  # query "<dataset> w<i>", positive "w<i+1>"
            for i in range(40):
                writer.write({"query": f"{name} w{i}", "positive": f"w{i + 1}", "dataset": name})
    with records.RecordWriter(root / "triplets", "triplet") as writer:
        for i in range(8):
            writer.write({"query": f"w{i}", "positive": f"w{i + 8}",
                          "negatives": [f"w{16 + 7 * i + k}" for k in range(7)] if i < 6 else
                          [f"w{k}" for k in range(7)], "dataset": "alpha"})
    return root


def config(data, **overrides):
    base = dict(image_text_dir=str(data / "images"), tokenizer_path=str(data / "tokenizer.json"),
                image_batch_size=4, image_size=16, image_max_length=8, text_dir=str(data / "pairs"),
                text_batch_size=4, text_max_length=6, seed=3, read_threads=2)
    return pipeline.DataConfig(**{**base, **overrides})


def caption_index(text_ids):
    """Record index i from the ids of caption "w{i}": [CLS] w{i} [SEP] pad..."""
    return [int(row[1]) - VOCAB["w0"] for row in text_ids]


# --------------------------------------------------------------------------------------- preprocessing


def normalised(rgb):
    return [(c / 255 - m) / s for c, m, s in zip(rgb, MEAN, STD, strict=True)]


def test_eval_crop_of_a_known_image(data, tmp_path):
    # 96x32, three 32-px vertical bands red | green | blue. Shorter side is already 32 (no resize); the centre
    # crop starts at left = round((96 - 32) / 2) = 32: exactly the green band.
    bands = np.zeros((32, 96, 3), np.uint8)
    bands[:, :32, 0] = bands[:, 32:64, 1] = bands[:, 64:, 2] = 255
    # 64 wide x 128 high, rows 0-31 red, 32-95 green, 96-127 blue: resized to 32 x 64, centre crop rows
    # 16..47 of the resized image = original rows 32..95 = green, except the bicubic blend near the edges.
    tall = np.zeros((128, 64, 3), np.uint8)
    tall[:32, :, 0] = tall[32:96, :, 1] = tall[96:, :, 2] = 255
    buf_bands, buf_tall = io.BytesIO(), io.BytesIO()
    Image.fromarray(bands).save(buf_bands, "PNG")
    Image.fromarray(tall).save(buf_tall, "PNG")
    with records.RecordWriter(tmp_path / "known", "image_text") as writer:
        writer.write({"image": buf_bands.getvalue(), "captions": ["w5 w6"]})
        writer.write({"image": buf_tall.getvalue(), "captions": ["w7", "w8"]})
    # read as jclip-eval and the trainer's evaluation do: the prepared set, then the embedder's decode
    known = tasks.load({"type": "image_text", "data": str(tmp_path / "known")})
    images = np.stack([embedder.image_pixels(image, 32) for image in known["images"]])
    green = np.asarray(normalised((0, 255, 0)), np.float32)  # (-1.7923, 2.0748, -1.4802)
    np.testing.assert_allclose(green, [-1.7922626, 2.0748837, -1.4802198], rtol=1e-6)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.float32
    np.testing.assert_allclose(images[0], np.broadcast_to(green, (32, 32, 3)), rtol=1e-6)
    # bicubic support at 2x downscale is 4 input rows either side: crop rows 4..27 are pure green
    np.testing.assert_allclose(images[1, 4:28], np.broadcast_to(green, (24, 32, 3)), rtol=1e-6)
    assert not np.allclose(images[1, 0], green)  # the top crop row does blend in red
    w = VOCAB["w0"]
    text = TextTokenizer(str(data / "tokenizer.json"))(known["captions"], 6, buckets=None)
    np.testing.assert_array_equal(text, [[2, w + 5, w + 6, 3, 0, 0], [2, w + 7, 3, 0, 0, 0], [2, w + 8, 3, 0, 0, 0]])
    np.testing.assert_array_equal(known["owner"], [0, 1, 1])
    assert known["counts"]["skipped_records"] == 0


def test_random_resized_crop_box_hand_derived():
    rng = np.random.default_rng(0)
    # area 1024 at aspect 1 on a 64x32 image: 32x32, top 0, left anywhere in [0, 32]
    for _ in range(20):
        left, top, w, h = preprocess.random_resized_crop_box(64, 32, rng, scale=(0.5, 0.5), ratio=(1, 1))
        assert (top, w, h) == (0, 32, 32) and 0 <= left <= 32
    # the whole 64x32 at aspect 1 never fits: fallback = centred crop with ratio clamped to 1:
    # h = 32, w = round(32 * 1) = 32, left = (64 - 32) // 2 = 16
    assert preprocess.random_resized_crop_box(64, 32, rng, scale=(1, 1), ratio=(1, 1)) == (16, 0, 32, 32)
    assert preprocess.random_resized_crop_box(40, 40, rng, scale=(1, 1), ratio=(1, 1)) == (0, 0, 40, 40)
    bands = np.zeros((32, 64, 3), np.uint8)
    bands[:, :16, 0] = bands[:, 16:48, 1] = bands[:, 48:, 2] = 255
    crop = preprocess.random_resized_crop(Image.fromarray(bands), 32, rng, scale=(1, 1), ratio=(1, 1))
    np.testing.assert_array_equal(np.asarray(crop), np.broadcast_to([0, 255, 0], (32, 32, 3)))


# ------------------------------------------------------------------------------------------ image-text


def test_decode_failure_is_dropped_and_counted(data):
    ds = pipeline.image_text_dataset(config(data, image_text_dir=str(data / "corrupt"), random_crop=False),
                                     share=(0, 1), repeat=False)
    batches = list(ds)
    # records 0, 1 (corrupt), 2, 3, 4 fill the first batch of 4; 5, 6 are the (kept) remainder
    assert [caption_index(b["text"]) for b in batches] == [[0, 2, 3, 4], [5, 6]]
    assert [int(b["decode_failures"]) for b in batches] == [1, 0]
    # uniform images stay uniform through resize + crop: pixel values identify the record
    for b in batches:
        for image, i in zip(b["image"], caption_index(b["text"]), strict=True):
            expected = np.broadcast_to(normalised(colour_of(i)), image.shape)
            np.testing.assert_allclose(image, expected, rtol=1e-5)


def test_process_shares_stack_into_the_single_process_batch(data):
    """Any process count: the processes' rows at a step, in process order, are the 1-process batch of that
    step (same records, same augmentation), so nothing is read twice or missed within a step."""
    # a finite stream, unshuffled: the tail global batch is split in order, later processes get fewer rows
    cfg = config(data, image_batch_size=4, text_batch_size=4)  # 2 rows per process
    shares = [[i for b in pipeline.image_text_dataset(cfg, share=(p, 2), repeat=False)
               for i in caption_index(b["text"])] for p in range(2)]
    assert shares == [[0, 1, 4, 5], [2, 3, 6]]

    for n in (2, 4):
        cfg = config(data, image_batch_size=4, text_batch_size=4, random_crop=True, crop_scale=(0.3, 1.0))
        single = pipeline.train_iterator(cfg, share=(0, 1))
        shares = [pipeline.train_iterator(cfg, share=(p, n)) for p in range(n)]
        for _ in range(12):  # several epochs of the 7 images; several draws of the 3 text datasets
            whole = next(single)
            parts = [next(it) for it in shares]
            for key, value in whole.items():
                if key == batch_schema.STATS_KEY:  # per-process values: the same text dataset at every process
                    assert [int(part[key]["text_dataset"]) for part in parts] == [int(value["text_dataset"])] * n
                    continue
                stacked = np.concatenate([part[key] for part in parts])
                np.testing.assert_array_equal(stacked, value, err_msg=f"{n} processes {key}")


# ------------------------------------------------------------------------------------------------ text


def test_dataset_selection_follows_weights():
    selection = pipeline.RandomDatasetSelectionMap([6, 3, 1], seed=0, block=1000)
    steps = 30_000
    picks = [selection[k] for k in range(steps)]
    chosen = np.asarray([d for d, _ in picks])
    # binomial std at n=30000 is <= 0.0029; 0.012 is 4 std
    np.testing.assert_allclose(np.bincount(chosen, minlength=3) / steps, [0.6, 0.3, 0.1], atol=0.012)
    for d in range(3):  # each dataset's batches are used in order, none skipped or repeated
        ranks = [j for dd, j in picks if dd == d]
        assert ranks == list(range(len(ranks)))
    # not a fixed interleave: the run lengths of dataset 0 vary (a period-10 pattern would not)
    assert len({len(run) for run in "".join(map(str, chosen[:2000])).split("1")}) > 3
    # random access far ahead agrees with sequential access, and the seed matters
    assert pipeline.RandomDatasetSelectionMap([6, 3, 1], seed=0, block=1000)[29_999] == picks[-1]
    other = [pipeline.RandomDatasetSelectionMap([6, 3, 1], seed=1, block=1000)[k][0] for k in range(200)]
    assert other != list(chosen[:200])


def test_text_batches_one_dataset_each_with_weights(data):
    cfg = config(data, text_weights={"alpha": 0.6, "beta": 0.3, "gamma": 0.1})
    it = iter(pipeline.text_dataset(cfg, share=(0, 1)))
    counts, alpha_queries = np.zeros(3), []
    for _ in range(200):
        b = next(it)
        d = int(b["dataset"])
        counts[d] += 1
        assert b["query"].shape == b["positive"].shape == (4, 6) and b["query"].dtype == np.int32
        # every query of the batch comes from the drawn dataset: "[CLS] <dataset> w<i> [SEP]"
        np.testing.assert_array_equal(b["query"][:, 1], VOCAB[DATASETS[d]])
        # positive of "<dataset> w<i>" is "w<i+1>"
        np.testing.assert_array_equal(b["positive"][:, 1], b["query"][:, 2] + 1)
        if d == 0:
            alpha_queries.extend(b["query"][:, 2].tolist())
    np.testing.assert_allclose(counts / 200, [0.6, 0.3, 0.1], atol=0.11)  # >= 3 std at n=200
    # alpha (40 records, 4 per batch): each epoch of 10 batches holds every record once
    assert sorted(alpha_queries[:40]) == [VOCAB[f"w{i}"] for i in range(40)]


def test_triplet_batches(data):
    cfg = config(data, text_dir=str(data / "triplets"), text_batch_size=2, text_max_length=4)
    b = next(iter(pipeline.text_dataset(cfg, share=(0, 1))))
    assert b["query"].shape == b["positive"].shape == (2, 4) and b["negatives"].shape == (2, 7, 4)
    for q, p, negs in zip(b["query"], b["positive"], b["negatives"], strict=True):
        i = int(q[1]) - VOCAB["w0"]
        assert p.tolist() == [2, VOCAB[f"w{i + 8}"], 3, 0]
        expected = [16 + 7 * i + k for k in range(7)] if i < 6 else list(range(7))
        assert negs.tolist() == [[2, VOCAB[f"w{n}"], 3, 0] for n in expected]


def test_bad_config_errors_name_the_value(data):
    with pytest.raises(ValueError, match="text_weights names \\['delta'\\], not datasets of"):
        pipeline.text_dataset(config(data, text_weights={"delta": 1.0}), share=(0, 1))
    # a dataset left out of text_weights would never be sampled: named, not dropped silently
    with pytest.raises(ValueError, match="text_weights gives no weight to \\['beta', 'gamma'\\] of .*pairs"):
        pipeline.text_dataset(config(data, text_weights={"alpha": 1.0}), share=(0, 1))
    with pytest.raises(ValueError, match="image_batch_size=3 must be a positive multiple of the 2"):
        pipeline.image_text_dataset(config(data, image_batch_size=3), share=(0, 2))
    with pytest.raises(ValueError, match="holds 'text_pair' records, expected 'image_text'"):
        pipeline.image_text_dataset(config(data, image_text_dir=str(data / "pairs")), share=(0, 1))


# -------------------------------------------------------------------------------------- steps, resume


def assert_same_batches(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_resume_yields_the_same_batches(data):
    cfg = config(data)
    it = pipeline.train_iterator(cfg, share=(0, 1))
    first = next(it)
    # the step's keys (data/batch.py) for image-text pairs and text pairs, and the per-process stats
    assert {k: v.shape for k, v in first.items() if k != batch_schema.STATS_KEY} == {
        "image": (4, 16, 16, 3), "image_caption": (4, 8), "text_query": (4, 6), "text_passage": (4, 6)}
    assert {k: np.shape(v) for k, v in first[batch_schema.STATS_KEY].items()} == {
        "decode_failures": (), "text_dataset": ()}
    for _ in range(4):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(6)]
    resumed = pipeline.train_iterator(cfg, share=(0, 1))
    resumed.set_state(state)
    assert_same_batches([next(resumed) for _ in range(6)], expected)


def test_workers_and_orbax_checkpoint(data, tmp_path):
    """Decoding in a worker process yields the in-process batches; the state saved in an orbax Composite
    next to the model restores a fresh (worker-backed) pipeline exactly."""
    in_process = pipeline.train_iterator(config(data), share=(0, 1))
    reference = [next(in_process) for _ in range(7)]
    cfg = config(data, worker_count=1, text_worker_count=1)
    it = pipeline.train_iterator(cfg, share=(0, 1))
    try:
        assert_same_batches([next(it) for _ in range(3)], reference[:3])
        manager = ocp.CheckpointManager(tmp_path / "ckpt", options=ocp.CheckpointManagerOptions(create=True))
        model_state = {"step": np.asarray(3, np.int32)}
        manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(model_state),
                                                data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
        assert_same_batches([next(it) for _ in range(4)], reference[3:])
    finally:
        it.close()
    restored = pipeline.train_iterator(cfg, share=(0, 1))
    try:
        abstract_state = {"step": np.asarray(0, np.int32)}
        manager.restore(3, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                   data=grain.checkpoint.CheckpointRestore(restored)))
        assert_same_batches([next(restored) for _ in range(4)], reference[3:])
    finally:
        restored.close()
        manager.close()


def test_make_global_batch(data):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    local = next(pipeline.train_iterator(config(data, image_batch_size=8, text_batch_size=8), share=(0, 1)))
    global_batch = pipeline.make_global_batch(local, mesh)
    image = global_batch["image"]
    assert isinstance(image, jax.Array) and image.shape == (8, 16, 16, 3)
    assert image.sharding.spec == jax.sharding.PartitionSpec("data")
    assert len(image.addressable_shards) == 8 and image.addressable_shards[0].data.shape == (1, 16, 16, 3)
    np.testing.assert_array_equal(np.asarray(global_batch["text_query"]), local["text_query"])
    stats = batch_schema.STATS_KEY  # per-process scalars stay numpy values
    assert global_batch[stats]["decode_failures"] == local[stats]["decode_failures"]
