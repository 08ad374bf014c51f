"""encode_image's transform equals Jina's for every PIL mode: resize and centre-crop in the image's own
mode, convert to RGB last (open_clip's eval transform, which jina-clip's image processor is built from).

The references are open_clip's own `image_transform` (torchvision Resize/CenterCrop on PIL, then
convert("RGB")) and a torchvision-free re-derivation of that order written here with PIL + numpy.
"""

import numpy as np
import pytest
from PIL import Image
from torch_compat import import_open_clip

from jclip_jax.preprocess import CLIP_MEAN, CLIP_STD, eval_transform

SIZE = 32
MODES = ("RGBA", "P", "LA", "L", "CMYK", "I;16", "RGB")


def make_image(mode: str, seed: int = 0, size=(45, 37)) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (h, w), dtype=np.uint8)  # partial transparency everywhere
    if mode == "RGBA":
        return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    if mode == "P":
        return Image.fromarray(rgb).quantize(colors=64)
    if mode == "LA":
        return Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA")
    if mode == "L":
        return Image.fromarray(rgb[..., 0], "L")
    if mode == "CMYK":
        return Image.fromarray(np.dstack([rgb, alpha]), "CMYK")
    if mode == "I;16":  # 16-bit grey; values above 255 saturate when converted to RGB
        return Image.fromarray(rng.integers(0, 400, (h, w)).astype(np.uint16))
    return Image.fromarray(rgb)


def jina_order_reference(img: Image.Image, size: int) -> np.ndarray:
    """torchvision-free: Resize(size) (shorter side, bicubic, in the image's mode) -> CenterCrop -> RGB."""
    w, h = img.size
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    img = img.resize(new, Image.Resampling.BICUBIC)
    left, top = int(round((new[0] - size) / 2)), int(round((new[1] - size) / 2))
    img = img.crop((left, top, left + size, top + size)).convert("RGB")
    return ((np.asarray(img, np.float32) / 255.0) - CLIP_MEAN) / CLIP_STD


@pytest.fixture(scope="module")
def open_clip_transform():
    return import_open_clip().transform.image_transform(SIZE, is_train=False)


@pytest.mark.parametrize("mode", MODES)
def test_eval_transform_matches_jina_order(mode, open_clip_transform, tmp_path):
    img = make_image(mode)
    assert img.mode == mode
    ours = eval_transform(img, SIZE)
    reference = open_clip_transform(img).numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(ours, reference, atol=2e-6)
    np.testing.assert_allclose(ours, jina_order_reference(img, SIZE), atol=2e-6)
    if mode not in ("CMYK", "I;16"):  # formats PNG cannot hold as such
        img.save(tmp_path / "im.png")
        np.testing.assert_array_equal(eval_transform(tmp_path / "im.png", SIZE), ours)


@pytest.mark.parametrize("mode", ("RGBA", "P", "LA", "I;16"))
def test_converting_first_would_differ(mode):
    """The test above can tell the orders apart: RGB-first gives visibly different pixels for these modes."""
    img = make_image(mode)
    rgb_first = eval_transform(img.convert("RGB"), SIZE)
    assert np.abs(rgb_first - eval_transform(img, SIZE)).max() > 0.05
