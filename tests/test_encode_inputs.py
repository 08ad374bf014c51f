"""Inputs to the model-card API: clear ValueErrors for what it does not take, and bounded memory for
images of extreme aspect ratio (the resize never sees more than 8:1)."""

import io

import numpy as np
import pytest
from flax import nnx
from helpers import write_wordpiece_tokenizer
from PIL import Image

from jclip_jax import JinaCLIP, preprocess
from jclip_jax.models import configs
from jclip_jax.preprocess import CLIP_MEAN, CLIP_STD, eval_transform
from jclip_jax.tokenizer import TextTokenizer


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = write_wordpiece_tokenizer(str(tmp_path_factory.mktemp("tok") / "tokenizer.json"))
    abstract = nnx.eval_shape(lambda: JinaCLIP(configs.tiny(), rngs=nnx.Rngs(0), tokenizer=TextTokenizer(path)))
    return abstract  # validation happens before any compute: no weights are needed


@pytest.mark.parametrize("texts, message", [
    (["a cat", 3], r"texts\[1\] is a int, not a string"),
    ([None], r"texts\[0\] is a NoneType, not a string"),
    (42, r"texts must be a string or a list of strings, got int"),
])
def test_bad_texts(model, texts, message):
    with pytest.raises(ValueError, match=message):
        model.encode_text(texts)


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), r"batch_size=0 must be a positive integer"),
    (dict(batch_size=-2), r"batch_size=-2 must be a positive integer"),
    (dict(batch_size=2.5), r"batch_size=2.5 must be a positive integer"),
    (dict(truncate_dim=3.5), r"truncate_dim=3.5 must be a positive integer or None"),
    (dict(truncate_dim="64"), r"truncate_dim='64' must be a positive integer or None"),
    (dict(truncate_dim=True), r"truncate_dim=True must be a positive integer or None"),
])
def test_bad_sizes(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model.encode_text(["a cat"], **kwargs)
    with pytest.raises(ValueError, match=message):
        model.encode_image([Image.new("RGB", (8, 8))], **kwargs)


def test_arrays_bytes_and_urls_are_refused_naming_the_accepted_types(model):
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    raw = png.getvalue()
    with pytest.raises(ValueError) as e:
        model.encode_image([Image.new("RGB", (8, 8)), raw])
    message = str(e.value)
    assert message.startswith("images[1] is a bytes; expected PIL.Image.Image or a file path")
    assert "PIL.Image.open(io.BytesIO(b))" in message and "PNG" not in message and "\\x" not in message
    with pytest.raises(ValueError, match=r"images\[0\] is a ndarray; .*PIL.Image.fromarray"):
        model.encode_image([np.zeros((8, 8, 3), np.uint8)])
    with pytest.raises(ValueError, match=r"images must be a list of .*, got ndarray"):
        model.encode_image(np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"images\[0\] is a URL"):
        model.encode_image(["https://example.com/cat.jpg"])


def test_extreme_aspect_ratio_is_cropped_before_the_resize(monkeypatch):
    """A 4000x2 image: every resize PIL is asked for stays within 8 x size^2 pixels (was ~448000 x 32)."""
    sizes = []
    resize = Image.Image.resize

    def recording(self, size, *args, **kwargs):
        sizes.append(size)
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording)
    rng = np.random.default_rng(0)
    tall = Image.fromarray(rng.integers(0, 256, (4000, 2, 3), dtype=np.uint8))
    out = eval_transform(tall, 32)
    assert out.shape == (32, 32, 3) and np.isfinite(out).all()
    assert sizes and all(w * h <= 8 * 32 * 32 for w, h in sizes), sizes


def test_aspect_ratio_bound_keeps_the_centre_crop():
    """When the shorter side already equals the output size there is no resize, so the unbounded transform
    is a plain centre crop, computable by hand: the bounded one must give the same pixels."""
    rng = np.random.default_rng(1)
    wide = rng.integers(0, 256, (32, 641, 3), dtype=np.uint8)  # 20:1
    left = round((641 - 32) / 2)
    expected = (wide[:, left:left + 32] / 255.0 - CLIP_MEAN) / CLIP_STD
    np.testing.assert_allclose(eval_transform(Image.fromarray(wide), 32), expected, atol=1e-6)
    # within the bound nothing changes at all
    image = Image.fromarray(rng.integers(0, 256, (30, 200, 3), dtype=np.uint8))
    assert preprocess.limit_aspect_ratio(image) is image
    assert preprocess.limit_aspect_ratio(Image.new("RGB", (4000, 1))).size == (8, 1)
