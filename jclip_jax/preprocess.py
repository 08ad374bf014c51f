"""Image preprocessing of jina-clip (spec §1.4), shared by the model-card API and the data pipeline.

Evaluation transform, exactly as `JinaCLIPImageProcessor`: shorter side -> `size` with PIL bicubic
(antialiased), longer side int(size * long / short); centre crop with top = round((H - size) / 2);
RGB; /255; normalise with the OpenAI CLIP mean/std.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

CLIP_MEAN = np.asarray((0.48145466, 0.4578275, 0.40821073), np.float32)
CLIP_STD = np.asarray((0.26862954, 0.26130258, 0.27577711), np.float32)


def load_image(image: Image.Image | str | os.PathLike) -> Image.Image:
    """Open a path (or pass a PIL image through) as an RGB PIL image; names the file on failure."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {os.fspath(image)!r}: {e}") from e


def resize_shortest_side(image: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size` (bicubic), keeping the aspect ratio like torchvision's Resize(int)."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return image
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    return image.resize((new_w, new_h), Image.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision CenterCrop: top = round((H - size) / 2), left = round((W - size) / 2)."""
    w, h = image.size
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (H, W, 3) with CLIP mean/std."""
    return (pixels.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD


def eval_transform(image: Image.Image | str | os.PathLike, size: int = 224) -> np.ndarray:
    """One image -> float32 (size, size, 3), NHWC-ready, the way jina-clip evaluates."""
    img = center_crop(resize_shortest_side(load_image(image), size), size)
    return normalize(np.asarray(img, dtype=np.uint8))
