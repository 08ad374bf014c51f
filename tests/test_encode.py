"""The model-card API and the spec's preprocessing (§1.4), on a tiny model with an in-process tokenizer."""

import numpy as np
import pytest
from flax import nnx
from helpers import random_image, write_wordpiece_tokenizer
from PIL import Image

from jclip_jax import JinaCLIP
from jclip_jax.models import configs
from jclip_jax.preprocess import CLIP_MEAN, CLIP_STD, eval_transform
from jclip_jax.tokenizer import TextTokenizer

TEXTS = ["a red circle on the left", "a photo of a dog", "machine learning", "two green triangles at the top",
         "a small yellow star over the lazy dog"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = write_wordpiece_tokenizer(str(tmp_path_factory.mktemp("tok") / "tokenizer.json"))
    return JinaCLIP(configs.tiny(), rngs=nnx.Rngs(0), tokenizer=TextTokenizer(path))


def test_tokenizer_pads_to_buckets_and_keeps_sep(model):
    tok = model.tokenizer
    ids = tok(["a photo of a cat", "a"], max_length=64)
    assert ids.shape == (2, 16) and ids.dtype == np.int32
    cls, sep = tok._hf.token_to_id("[CLS]"), tok._hf.token_to_id("[SEP]")
    assert ids[0, 0] == cls and ids[1, :3].tolist() == [cls, tok._hf.token_to_id("a"), sep]
    assert (ids[1, 3:] == 0).all()
    long = tok(["a photo of a cat " * 20], max_length=10)
    assert long.shape == (1, 10) and long[0, -1] == sep


def test_encode_text_normalised_in_order_and_batch_invariant(model):
    full = model.encode_text(TEXTS, batch_size=8)
    assert full.shape == (5, 64) and full.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1.0, atol=1e-6)
    small = model.encode_text(TEXTS, batch_size=2)
    np.testing.assert_allclose(small, full, atol=1e-5)
    single = np.stack([model.encode_text([t], batch_size=1)[0] for t in TEXTS[::-1]])[::-1]
    np.testing.assert_allclose(single, full, atol=1e-5)


def test_truncate_dim_truncates_before_normalising(model):
    full = model.encode_text(TEXTS[:3])
    raw = np.asarray(model.text_features(model.tokenizer(TEXTS[:3], max_length=64)))
    short = model.encode_text(TEXTS[:3], truncate_dim=16)
    expected = raw[:, :16] / np.linalg.norm(raw[:, :16], axis=1, keepdims=True)
    np.testing.assert_allclose(short, expected, atol=1e-5)
    assert not np.allclose(short, full[:, :16])  # normalising after truncation matters
    with pytest.raises(ValueError, match="truncate_dim"):
        model.encode_text(TEXTS[:1], truncate_dim=65)


def test_encode_image_accepts_pil_and_paths(model, tmp_path):
    images = [random_image(i, size=(40 + 8 * i, 30)) for i in range(3)]
    paths = []
    for i, im in enumerate(images):
        paths.append(str(tmp_path / f"{i}.png"))
        im.save(paths[-1])
    a = model.encode_image(images, batch_size=2)
    b = model.encode_image(paths, batch_size=4)
    assert a.shape == (3, 64)
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="cannot read image"):
        model.encode_image([str(tmp_path / "missing.png")])


def test_preprocessing_of_a_known_image_is_hand_computable():
    # A 48x32 image whose pixel (y, x) has red = x: no resize (short side already 32),
    # centre crop keeps columns 8..39 (left = round((48 - 32) / 2) = 8).
    arr = np.zeros((32, 48, 3), np.uint8)
    arr[..., 0] = np.arange(48)[None, :]
    arr[..., 1] = 200
    out = eval_transform(Image.fromarray(arr), size=32)
    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, :, 0], (np.arange(8, 40) / 255.0 - 0.48145466) / 0.26862954, atol=1e-6)
    np.testing.assert_allclose(out[..., 1], (200 / 255.0 - 0.4578275) / 0.26130258, atol=1e-6)
    # A constant image of another aspect: shorter side 64 -> 32 (bicubic keeps a constant), any crop
    const = Image.new("RGB", (100, 64), (10, 20, 30))
    np.testing.assert_allclose(eval_transform(const, 32)[5, 7], (np.array([10, 20, 30]) / 255.0 - CLIP_MEAN) / CLIP_STD,
                               atol=1e-6)
    # Shorter side to 32, longer int(32 * 90 / 60) = 48, then the central 32 columns
    wide = np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(wide).resize((48, 32), Image.BICUBIC))[:, 8:40]
    np.testing.assert_allclose(eval_transform(Image.fromarray(wide), 32),
                               (expected / 255.0 - CLIP_MEAN) / CLIP_STD, atol=1e-6)
