"""Image preprocessing of jina-clip (spec §1.4), shared by the model-card API and the data pipeline.

Evaluation transform, exactly as `JinaCLIPImageProcessor` (open_clip's Resize, CenterCrop, then
convert to RGB): shorter side -> `size` with PIL bicubic (antialiased), longer side
int(size * long / short); centre crop with top = round((H - size) / 2); both in the image's own mode,
RGB last; /255; normalise with the OpenAI CLIP mean/std. Images more elongated than MAX_ASPECT_RATIO (8:1)
are first centre-cropped to 8:1 (`limit_aspect_ratio`), which bounds the resize's memory.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

CLIP_MEAN = np.asarray((0.48145466, 0.4578275, 0.40821073), np.float32)
CLIP_STD = np.asarray((0.26862954, 0.26130258, 0.27577711), np.float32)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> RGB, for training data (jclip-prepare, the grain pipeline; the model-card API keeps
    Jina's order in eval_transform instead). 16-bit greyscale (PNG/TIFF modes I;16*, I) is scaled to 8 bits first
    (v / 257, the inverse of 8 -> 16 bit expansion): PIL's convert("RGB") clips it, turning most of the
    image white. (PIL already reduces 16-bit RGB PNGs to 8 bits when it opens them.)"""
    if image.mode.startswith("I;16") or image.mode == "I":
        pixels = np.clip(np.asarray(image, dtype=np.float64), 0, 65535)
        image = Image.fromarray(np.rint(pixels / 257).astype(np.uint8), "L")
    return image.convert("RGB")  # a loaded copy even when already RGB: callers close the file after


def load_image(image: Image.Image | str | os.PathLike) -> Image.Image:
    """Open a path (or pass a PIL image through) in the image's own mode; names the file on failure."""
    if isinstance(image, Image.Image):
        return image
    try:
        with Image.open(image) as img:
            img.load()
        return img
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


# Longest side / shortest side beyond which the evaluation transform first centre-crops the longer side: the
# shortest-side resize of a 4000x1 image would otherwise allocate a 896000x224 image (~1 GB for size 224).
MAX_ASPECT_RATIO = 8


def limit_aspect_ratio(image: Image.Image, max_ratio: float = MAX_ASPECT_RATIO) -> Image.Image:
    """Centre-crop the longer side to `max_ratio` x the shorter one, so a following shortest-side resize
    allocates at most max_ratio * size^2 pixels. The centre crop that follows the resize keeps the central
    square anyway, so the output is the same region (up to half a source pixel of alignment, and the
    resize's integer rounding); images within the ratio pass through untouched (jina-clip's result exactly).
    """
    w, h = image.size
    short, long = min(w, h), max(w, h)
    if short < 1:
        raise ValueError(f"image of size {w}x{h} has no pixels")
    keep = int(np.ceil(max_ratio * short))
    if long <= keep:
        return image
    offset = (long - keep) // 2
    box = (offset, 0, offset + keep, h) if w > h else (0, offset, w, offset + keep)
    return image.crop(box)


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
    # Jina's order: resize and crop in the image's own mode, RGB last. Converting first changes the pixels
    # of RGBA/LA (PIL resamples those with premultiplied alpha) and P (resampled nearest) images.
    img = center_crop(resize_shortest_side(limit_aspect_ratio(load_image(image)), size), size).convert("RGB")
    return normalize(np.asarray(img, dtype=np.uint8))


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params with a numpy Generator: (left, top, crop_w, crop_h).

    Up to 10 tries of area ~ U(scale) * W*H and log-uniform aspect ratio; if none fits, the largest
    centred crop whose aspect ratio is clamped into `ratio`.
    """
    area = width * height
    log_ratio = (np.log(ratio[0]), np.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = np.exp(rng.uniform(*log_ratio))
        w = int(round(np.sqrt(target_area * aspect)))
        h = int(round(np.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def random_resized_crop(
    image: Image.Image,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Image.Image:
    """RandomResizedCrop (open_clip training): random box, cropped, then bicubic resize to size x size."""
    left, top, w, h = random_resized_crop_box(image.width, image.height, rng, scale, ratio)
    return image.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)


def normalize_into(pixels: np.ndarray, out: np.ndarray) -> np.ndarray:
    """`normalize` written into a preallocated float32 array (e.g. a slot of a batch): same operations in
    the same order, so bitwise equal to `normalize(pixels)`, without the temporaries and a later stack copy.
    uint8 (..., 3) -> out float32 (..., 3)."""
    np.divide(pixels, np.float32(255.0), out=out, dtype=np.float32)
    np.subtract(out, CLIP_MEAN, out=out)
    np.divide(out, CLIP_STD, out=out)
    return out
