"""CLIP image preprocessing in PIL + numpy: the reference the DALI pipeline is checked against.

LLaVA-1.5 (`image_aspect_ratio="pad"`): pad the image to a square with the CLIP mean
colour (`expand2square`), then CLIPImageProcessor's steps: bicubic resize of the shortest
edge, center crop, scale to [0, 1], normalise with CLIP's mean/std. `aspect="resize"`
skips the padding (plain CLIP preprocessing: the long side is cropped).
No torchvision: it does not import beside our torch.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOR = tuple(int(x * 255) for x in CLIP_MEAN)  # (122, 116, 104), as LLaVA-1.5
ASPECTS = ("pad", "resize")


def expand2square(image: Image.Image, color: tuple[int, ...] = PAD_COLOR) -> Image.Image:
    """Centre `image` on a square of side max(width, height) filled with `color` (LLaVA's)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), color)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def preprocess_image(image: Image.Image, image_size: int, aspect: str = "pad") -> np.ndarray:
    """Return the CLIP input for `image`: float32 `[3, image_size, image_size]`, normalised.

    Any PIL mode works (grayscale, palette, RGBA: alpha is dropped, as LLaVA's `convert`).
    """
    if aspect not in ASPECTS:
        raise ValueError(f"aspect must be one of {ASPECTS}, got {aspect!r}")
    image = image.convert("RGB")
    if aspect == "pad":
        image = expand2square(image)
    # Shortest edge -> image_size; the long edge truncates like torchvision/transformers.
    width, height = image.size
    short, long = sorted((width, height))
    new_long = int(image_size * long / short)
    new_size = (image_size, new_long) if width <= height else (new_long, image_size)
    image = image.resize(new_size, Image.Resampling.BICUBIC)
    left = (image.width - image_size) // 2
    top = (image.height - image_size) // 2
    image = image.crop((left, top, left + image_size, top + image_size))
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    pixels = (pixels - np.asarray(CLIP_MEAN, dtype=np.float32)) / np.asarray(CLIP_STD, dtype=np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))
