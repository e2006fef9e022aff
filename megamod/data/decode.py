"""Image decoding for the loader: encoded bytes -> CLIP-preprocessed float32 [n, 3, S, S].

Two decoders with one call signature (`ImageDecoder`): `PythonImageDecoder` (Pillow +
`megamod.data.preprocess`, LLaVA-1.5's steps, the reference) and `DaliImageDecoder`
(NVIDIA DALI); `make_image_decoder` picks one for `data.image_decoder`.

DALI does the same steps as the Pillow reference: decode
to RGB (`fn.decoders.image`, device "mixed" on a GPU, "cpu" without one), pad to a square
with the CLIP mean colour (`image_aspect_ratio="pad"`, `expand2square`), bicubic resize of
the short side to S, center crop S x S, normalise with CLIP's mean/std. Sizes and offsets
are computed as Pillow's code computes them (integer floor), from the shape peeked from
the encoded bytes, so the two paths differ only by interpolation (~0.002 mean abs,
normalised units).

Why not `fn.readers.webdataset`: its order is its own (shuffle buffer, per-shard split
by `shard_id`), while megamod's order is one global, seeded stream over all sources, a
mixture included, that a checkpoint resumes at an exact position whatever the DP size
(`megamod.data.reader.SampleOrder`). So the loader reads the tar members itself, by
random access through the same `.idx` files (`wds2idx`) the DALI reader uses, and feeds the
encoded images here through `fn.external_source`, one batch per step.

Images DALI cannot decode (GIF, or a file it rejects) go to a fallback decoder (the
loader's Pillow one); only an image neither can decode is reported as bad.

Both paths refuse an image over `ImageLimits` (`data.max_image_bytes`, and
`data.max_image_pixels` read as width x height from its header, which Pillow parses
without decoding) before decoding it: a few-MB JPEG of 13000 x 13000 pixels would
otherwise take ~0.5 GB as RGB, more in the resize. The shard builder and `megamod
generate` check the same limits.
"""

from __future__ import annotations

import io
import re
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from megamod.config import DataConfig
from megamod.data.preprocess import CLIP_MEAN, CLIP_STD, PAD_COLOR, preprocess_image
from megamod.errors import ConfigError

# Decoders map (member name, encoded bytes) pairs to float32 [n, 3, S, S] and {index: error}.
ImageDecoder = Callable[[Sequence[tuple[str, bytes]]], tuple[np.ndarray, dict[int, str]]]

MAX_BATCH = 64  # images per pipeline run; larger batches are split
# Extensions (as the shard builder names members) that DALI's decoder reads.
DALI_FORMATS = frozenset({"jpg", "jpeg", "png", "tif", "tiff", "bmp", "jp2", "webp", "pnm", "ppm", "pgm", "pbm"})
# The pixels in Pillow's DecompressionBombError ("Image size (400000000 pixels) exceeds ...").
_PILLOW_PIXELS = re.compile(r"\((\d+) pixels\)")
_FILTERS_LOCK = threading.Lock()  # held while ImageLimits.open swaps the warning filters


class ImageTooLarge(ValueError):
    """An image over `ImageLimits`: refused before it is decoded."""


@dataclass(frozen=True)
class ImageLimits:
    """The largest image worth decoding: encoded bytes and width x height. `*_key` name
    the setting in messages (the config key, or a command's option)."""

    max_pixels: int = DataConfig.max_image_pixels
    max_bytes: int = DataConfig.max_image_bytes
    pixels_key: str = "data.max_image_pixels"
    bytes_key: str = "data.max_image_bytes"

    def check_bytes(self, nbytes: int) -> None:
        if nbytes > self.max_bytes:
            raise ImageTooLarge(f"{nbytes:,} bytes, over the limit of {self.max_bytes:,} ({self.bytes_key})")

    def open(self, source: str | Path | IO[bytes]) -> Image.Image:
        """The image with only its header read (nothing decoded yet), if its width x height
        is within the limit; else ImageTooLarge. Pillow's errors for what is not an image
        pass through."""
        # This limit decides, below: Pillow's warning (over ~89 M pixels) is only noise.
        # catch_warnings swaps the process's filter list in and out; the lock keeps the
        # decode pool's threads from restoring each other's (a header read is brief).
        with _FILTERS_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                image = Image.open(source)
            except Image.DecompressionBombError as e:  # Pillow's own limit, above ~179 M pixels
                raise ImageTooLarge(self._over_pillows_limit(e)) from None
        width, height = image.size
        if width * height > self.max_pixels:
            image.close()
            raise ImageTooLarge(f"{width} x {height} = {self._over(width * height)}")
        return image

    def _over(self, pixels: int) -> str:
        return f"{pixels:,} pixels, over the limit of {self.max_pixels:,} ({self.pixels_key})"

    def _over_pillows_limit(self, error: Image.DecompressionBombError) -> str:
        """Pillow refuses to open an image past its own limit, so its width and height are
        not known; its message has the pixels."""
        found = _PILLOW_PIXELS.search(str(error))
        if found and int(found[1]) > self.max_pixels:
            return self._over(int(found[1]))
        # Under a limit set above Pillow's (or a message without the count).
        return f"over Pillow's own limit of {Image.MAX_IMAGE_PIXELS * 2:,} pixels"

    def check(self, data: bytes) -> str | None:
        """Why an encoded image must not be decoded, from its length and header alone;
        None if it is within the limits or its header is unreadable (the decoder then
        says what is wrong with it)."""
        try:
            self.check_bytes(len(data))
            self.open(io.BytesIO(data)).close()
        except ImageTooLarge as e:
            return str(e)
        except Exception:  # Pillow's many types for "not an image it knows": no size to check
            pass
        return None


class PythonImageDecoder:
    """The DALI-free path: Pillow decode + `preprocess_image`, one image per pool task."""

    def __init__(self, image_size: int, aspect: str, pool: ThreadPoolExecutor, limits: ImageLimits = ImageLimits()):
        self.image_size, self.aspect, self._pool, self.limits = image_size, aspect, pool, limits

    def _one(self, data: bytes) -> np.ndarray | str:
        try:
            self.limits.check_bytes(len(data))
            with self.limits.open(io.BytesIO(data)) as image:
                return preprocess_image(image, self.image_size, self.aspect)
        except ImageTooLarge as e:
            return str(e)
        except UnidentifiedImageError:
            return "not an image format Pillow knows"
        except Exception as e:  # Pillow signals corrupt data with many types
            return f"{type(e).__name__}: {e}"

    def __call__(self, images: Sequence[tuple[str, bytes]]) -> tuple[np.ndarray, dict[int, str]]:
        pixels = np.zeros((len(images), 3, self.image_size, self.image_size), dtype=np.float32)
        errors = {}
        for i, result in enumerate(self._pool.map(self._one, [data for _, data in images])):
            if isinstance(result, str):
                errors[i] = result
            else:
                pixels[i] = result
        return pixels, errors


def _clip_pipeline(image_size: int, aspect: str, device: str, num_threads: int, device_id: int | None) -> Any:
    """The DALI pipeline of `DaliImageDecoder`, built (DALI is imported only here)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    @pipeline_def(batch_size=MAX_BATCH, prefetch_queue_depth=1, exec_dynamic=True)
    def clip() -> Any:
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        image = fn.decoders.image(encoded, device=device, output_type=types.RGB, adjust_orientation=False)
        # Pillow ignores EXIF orientation (so does LLaVA): the peeked shape is the stored one.
        hw = fn.cast(fn.peek_image_shape(encoded, adjust_orientation=False)[0:2], dtype=types.INT32)
        if aspect == "pad":
            side = dmath.max(hw[0], hw[1])
            # expand2square pastes at ((side - w) // 2, (side - h) // 2): a slice from minus that.
            image = fn.slice(image, start=-((side - hw) // 2), shape=fn.stack(side, side), axis_names="HW",
                             out_of_bounds_policy="pad", fill_values=list(PAD_COLOR))
            hw = fn.stack(side, side)
        short = dmath.min(hw[0], hw[1])
        size = image_size * hw // short  # the short side -> image_size, the long one floored
        image = fn.resize(image, resize_y=fn.cast(size[0], dtype=types.FLOAT), resize_x=fn.cast(size[1], dtype=types.FLOAT),
                          interp_type=types.INTERP_CUBIC)
        image = fn.slice(image, start=(size - image_size) // 2, shape=[image_size, image_size], axis_names="HW")
        return fn.crop_mirror_normalize(image, dtype=types.FLOAT, output_layout="CHW",
                                        mean=[255 * m for m in CLIP_MEAN], std=[255 * s for s in CLIP_STD])

    pipe = clip(num_threads=num_threads, device_id=device_id)
    pipe.build()
    return pipe


class DaliImageDecoder:
    """Decodes and preprocesses batches of encoded images with one DALI pipeline.

    `device_id=None` runs on the CPU; a CUDA device id decodes with nvJPEG ("mixed") and
    preprocesses on that GPU. Results are host arrays. `fallback` (same call signature)
    takes the images DALI cannot read. Images over `limits` (checked on the host from
    their headers) are errors, never fed to DALI. Not thread-safe: one caller at a time.
    """

    def __init__(
        self, image_size: int, aspect: str, num_threads: int, fallback: ImageDecoder, device_id: int | None = None,
        limits: ImageLimits = ImageLimits(),
    ):
        self.image_size, self.fallback, self.limits = image_size, fallback, limits
        self._pipe = _clip_pipeline(
            image_size, aspect, "cpu" if device_id is None else "mixed", num_threads, device_id
        )

    def _run(self, encoded: Sequence[bytes]) -> np.ndarray:
        (out,) = self._pipe.run(encoded=[np.frombuffer(data, dtype=np.uint8) for data in encoded])
        return (out.as_cpu() if hasattr(out, "as_cpu") else out).as_array()

    def __call__(self, images: Sequence[tuple[str, bytes]]) -> tuple[np.ndarray, dict[int, str]]:
        """`images`: (member name, encoded bytes) pairs; the name's extension says whether
        DALI can read it. Returns float32 [n, 3, S, S] and {index: error} for the images no
        decoder could read (their rows are zero)."""
        size = self.image_size
        pixels = np.zeros((len(images), 3, size, size), dtype=np.float32)
        too_large = {i: error for i, (_, data) in enumerate(images) if (error := self.limits.check(data))}
        usable = [i for i in range(len(images)) if i not in too_large]
        by_dali = [i for i in usable if images[i][0].rpartition(".")[2].lower() in DALI_FORMATS]
        to_fallback = sorted(set(usable) - set(by_dali))
        for start in range(0, len(by_dali), MAX_BATCH):
            chunk = by_dali[start : start + MAX_BATCH]
            try:
                pixels[chunk] = self._run([images[i][1] for i in chunk])
            except RuntimeError:
                # One bad image fails the whole run: find it by decoding one at a time.
                for i in chunk:
                    try:
                        pixels[i] = self._run([images[i][1]])[0]
                    except RuntimeError:
                        to_fallback.append(i)
        errors = too_large
        if to_fallback:
            pixels[to_fallback], fallback_errors = self.fallback([images[i] for i in to_fallback])
            errors |= {to_fallback[j]: error for j, error in fallback_errors.items()}
        return pixels, errors


def make_image_decoder(
    choice: str, image_size: int, aspect: str, pool: ThreadPoolExecutor, num_threads: int, *,
    max_pixels: int, max_bytes: int,
) -> ImageDecoder:
    """`data.image_decoder`: "dali" (GPU decode when torch sees one; Pillow for what DALI
    cannot read), "python", or "auto" (DALI when installed); images over `max_pixels`
    (`data.max_image_pixels`) or `max_bytes` (`data.max_image_bytes`) are errors."""
    import torch  # here: the shard builder imports this module's limits without torch

    limits = ImageLimits(max_pixels, max_bytes)
    python = PythonImageDecoder(image_size, aspect, pool, limits)
    if choice == "python":
        return python
    try:
        import nvidia.dali  # noqa: F401  (whether DALI is installed)
    except ImportError as e:
        if choice == "dali":
            raise ConfigError(
                f"data.image_decoder=dali but NVIDIA DALI does not import ({e}): "
                "pip install nvidia-dali-cuda120, or set data.image_decoder=python"
            ) from None
        return python
    device_id = torch.cuda.current_device() if torch.cuda.is_available() else None
    return DaliImageDecoder(image_size, aspect, num_threads, python, device_id, limits)
