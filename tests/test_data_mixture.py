"""Weighted image-text mixtures: per-example selection with exact quotas per block, each source's examples
used once in order, the realised mixture counted per batch, exact resume."""

import numpy as np
import pytest
from test_data_pipeline import VOCAB, png, write_tokenizer

from jclip_jax.data import pipeline, records


def test_stratified_selection_has_exact_quotas_random_order_and_o1_lookup():
    selection = pipeline.StratifiedSelectionMap([3.0, 1.0, 0.5], seed=1, block=90)
    assert selection.quotas.tolist() == [60, 20, 10]  # 90 * (3, 1, 0.5) / 4.5
    picks = [selection[k] for k in range(3 * 90)]
    for d, quota in enumerate((60, 20, 10)):
        ranks = [rank for source, rank in picks if source == d]
        assert ranks == list(range(3 * quota))  # each example of each source once, in its own order
        for b in range(3):  # exact quota in every block
            assert sum(source == d for source, _ in picks[90 * b: 90 * (b + 1)]) == quota
    blocks = [[source for source, _ in picks[90 * b: 90 * (b + 1)]] for b in range(3)]
    assert blocks[0] != blocks[1] != blocks[2]  # shuffled per block, not a fixed interleave
    # a far index, straight away (no replay of earlier blocks), agrees with a fresh map
    far = 90 * 1_000_000 + 17
    fresh = pipeline.StratifiedSelectionMap([3.0, 1.0, 0.5], seed=1, block=90)
    assert selection[far] == fresh[far] and selection[far][1] >= 1_000_000 * 10
    with pytest.raises(ValueError, match="below 1/90"):
        pipeline.StratifiedSelectionMap([1.0, 1e-4], seed=0, block=90)


def test_stratified_selection_is_safe_under_concurrent_reads():
    """grain's read threads share one map: lookups from 8 threads across many blocks (the block cache
    evicting all the time) give the single-threaded answers, and none fails."""
    import pickle
    import sys
    from concurrent.futures import ThreadPoolExecutor

    indices = np.random.default_rng(0).integers(0, 16 * 400, size=20_000).tolist()
    want = [pipeline.StratifiedSelectionMap([3.0, 1.0], seed=2, block=16)[k] for k in indices]
    shared = pipeline.StratifiedSelectionMap([3.0, 1.0], seed=2, block=16)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch often enough that an unguarded cache fails (KeyError 4 in 5)
    try:
        for _ in range(2):
            with ThreadPoolExecutor(8) as pool:
                assert list(pool.map(shared.__getitem__, indices, chunksize=50)) == want
    finally:
        sys.setswitchinterval(interval)
    copy = pickle.loads(pickle.dumps(shared))  # as grain hands it to a worker process: with its own lock
    assert [copy[k] for k in indices[:100]] == want[:100]


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    write_tokenizer(root / "tokenizer.json")
    for name, first in (("laion", 0), ("long", 40)):  # captions w0..w9 in "laion", w40..w49 in "long"
        with records.RecordWriter(root / name, "image_text") as writer:
            for i in range(first, first + 10):
                writer.write({"key": str(i), "image": png((i, i, i)), "captions": [f"w{i}"]})
    return root


def mixture_config(root, **overrides):
    base = dict(image_text_dir="", tokenizer_path=str(root / "tokenizer.json"), image_batch_size=8, image_size=8,
                image_max_length=4, seed=5, read_threads=2,
                image_text_mixture=((str(root / "laion"), 3.0), (str(root / "long"), 1.0)))
    return pipeline.DataConfig(**{**base, **overrides})


def test_mixture_batches_count_their_sources_and_resume_exactly(two_sources):
    config = mixture_config(two_sources)
    assert pipeline.image_text_source_names(config) == ["laion", "long"]
    it = iter(pipeline.image_text_dataset(config, share=(0, 1)))
    batches = [next(it) for _ in range(6)]
    totals = np.zeros(2, np.int64)
    for batch in batches:
        words = batch["text"][:, 1] - VOCAB["w0"]  # [CLS] w<i> [SEP]: the record index
        from_long = int(np.sum(words >= 40))
        assert batch["source_counts"].tolist() == [8 - from_long, from_long]
        totals += batch["source_counts"]
    # 48 examples drawn from a block of 65,536 with quotas 3:1 — close to 36:12, not exact this early
    assert totals.sum() == 48 and 24 <= totals[0] <= 44

    it = iter(pipeline.image_text_dataset(config, share=(0, 1)))
    for _ in range(2):
        next(it)
    state = it.get_state()
    resumed = iter(pipeline.image_text_dataset(config, share=(0, 1)))
    resumed.set_state(state)
    for expected in batches[2:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["text"], expected["text"])
        np.testing.assert_array_equal(got["image"], expected["image"])
        np.testing.assert_array_equal(got["source_counts"], expected["source_counts"])


def test_mixture_config_errors(tmp_path):
    from jclip_jax.models import configs
    from jclip_jax.training import config as train_config

    config = train_config.base_config(configs.tiny(), stage=1)
    config.data.tokenizer_path = "tok.json"
    config.data.text_dir = "pairs"
    config.data.image_text = (("data/laion", 0.0),)
    with pytest.raises(ValueError, match=r"config.data.image_text entry \('data/laion', 0.0\) must be a "):
        train_config.validate(config)
    config.data.image_text = (("data/laion", 0.8), ("data/long", 0.2))
    checked = train_config.validate(config)  # no image_text_dir needed with a mixture
    assert checked.data.image_text_mixture == (("data/laion", 0.8), ("data/long", 0.2))
