"""CLIP preprocessing against transformers' CLIPImageProcessor on real photos."""

import numpy as np
import pytest
import skimage.data
from PIL import Image
from transformers import CLIPImageProcessor

from megamod.data.preprocess import CLIP_MEAN, CLIP_STD, PAD_COLOR, expand2square, preprocess_image


def photo(name):
    return Image.fromarray(getattr(skimage.data, name)())


@pytest.mark.parametrize("size", [224, 336])
def test_matches_clip_image_processor(size):
    # Without torchvision, CLIPImageProcessor runs its PIL backend: measured bit-identical
    # (max abs diff 0.0) on these images at 224 and 336, both aspects.
    reference = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    portrait = photo("coffee").transpose(Image.Transpose.ROTATE_90)
    for image in [photo("astronaut"), photo("chelsea"), photo("rocket"), photo("camera"), portrait]:
        for aspect in ("pad", "resize"):
            rgb = image.convert("RGB")
            src = expand2square(rgb) if aspect == "pad" else rgb
            want = reference(images=src, return_tensors="np")["pixel_values"][0]
            got = preprocess_image(image, size, aspect)
            assert got.shape == (3, size, size) and got.dtype == np.float32
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_pad_and_resize_differ_on_non_square_only():
    square, wide = photo("astronaut"), photo("rocket")
    assert np.array_equal(preprocess_image(square, 64, "pad"), preprocess_image(square, 64, "resize"))
    assert not np.allclose(preprocess_image(wide, 64, "pad"), preprocess_image(wide, 64, "resize"))
    with pytest.raises(ValueError, match="aspect"):
        preprocess_image(wide, 64, "stretch")


def test_pad_colour_fills_the_border():
    assert PAD_COLOR == (122, 116, 104)
    pad_value = (np.array(PAD_COLOR) / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    white_value = (1 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    # 80x40 white -> 80x80 square with rows 20..59 white -> resized to 40: rows 10..29 white.
    out = preprocess_image(Image.new("RGB", (80, 40), "white"), 40, "pad")
    for rows in (out[:, :8], out[:, 32:]):  # bicubic blends 2 rows at the edges: skip them
        np.testing.assert_allclose(rows, np.broadcast_to(pad_value[:, None, None], rows.shape), atol=1e-6)
    np.testing.assert_allclose(out[:, 12:28], np.broadcast_to(white_value[:, None, None], (3, 16, 40)), atol=1e-6)
    # Tall images are padded left and right.
    out = preprocess_image(Image.new("RGB", (40, 80), "white"), 40, "pad")
    np.testing.assert_allclose(out[:, :, :8], np.broadcast_to(pad_value[:, None, None], (3, 40, 8)), atol=1e-6)


def test_grayscale_palette_and_rgba_inputs():
    gray = photo("camera")
    assert gray.mode == "L"
    want = preprocess_image(gray.convert("RGB"), 32)
    got = preprocess_image(gray, 32)
    assert got.shape == (3, 32, 32) and np.array_equal(got, want)
    pixels = got * np.array(CLIP_STD)[:, None, None] + np.array(CLIP_MEAN)[:, None, None]
    np.testing.assert_allclose(pixels, np.broadcast_to(pixels[0], pixels.shape), atol=1e-6)  # gray stays gray

    palette = photo("chelsea").convert("P")
    assert preprocess_image(palette, 32).shape == (3, 32, 32)

    logo = photo("logo")
    assert logo.mode == "RGBA"
    transparent = logo.copy()
    transparent.putalpha(0)  # alpha is dropped (as LLaVA's convert("RGB")): same pixels
    assert np.array_equal(preprocess_image(transparent, 32), preprocess_image(logo, 32))
    assert np.array_equal(preprocess_image(logo, 32), preprocess_image(logo.convert("RGB"), 32))
