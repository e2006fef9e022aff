"""`megamod build-shards`: LLaVA or MIMIC-IT annotations + images -> WebDataset shards.

    megamod build-shards --format {llava,mimicit} --annotations FILE --images PATH --output DIR
        [--name NAME] [--shard-size N] [--shard-bytes N] [--max-samples N] [--workers N]
        [--max-image-bytes N] [--max-image-pixels N] [--force]

The builder, its output and how it resumes: `megamod.data.shards`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from megamod.config import DataConfig
from megamod.data.shards import DEFAULT_SHARD_BYTES, DEFAULT_SHARD_SIZE, FORMATS, build_shards
from megamod.errors import DataError


def _parser() -> argparse.ArgumentParser:
    def at_least(low: int):
        def parse(text: str) -> int:
            value = int(text)
            if value < low:
                raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
            return value

        return parse

    positive = at_least(1)

    p = argparse.ArgumentParser(
        prog="megamod build-shards",
        description="Build WebDataset shards (+ DALI indexes, manifest.json) from LLaVA or MIMIC-IT data.",
    )
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--annotations", required=True, type=Path,
                   help="LLaVA JSON array, or MIMIC-IT instruction JSON")
    p.add_argument("--images", required=True, type=Path,
                   help="folder the LLaVA 'image' paths are relative to, or MIMIC-IT image JSON (id -> base64)")
    p.add_argument("--output", required=True, type=Path, help="output folder")
    p.add_argument("--name", help="shard name prefix (default: the annotations file stem)")
    p.add_argument("--shard-size", type=positive, default=DEFAULT_SHARD_SIZE, help="max samples per shard")
    p.add_argument("--shard-bytes", type=positive, default=DEFAULT_SHARD_BYTES, help="max bytes per shard")
    p.add_argument("--max-samples", type=positive, help="stop after this many samples")
    p.add_argument("--workers", type=at_least(0), default=None,
                   help="image-decoding processes (default: one per CPU; 0: none, decode in this process)")
    p.add_argument("--max-image-bytes", type=positive, default=DataConfig.max_image_bytes,
                   help="skip a sample whose image file is larger (default: data.max_image_bytes's, %(default)s)")
    p.add_argument("--max-image-pixels", type=positive, default=DataConfig.max_image_pixels,
                   help="skip a sample whose image has more pixels, width x height, read before decoding "
                   "(default: data.max_image_pixels's, %(default)s)")
    p.add_argument("--force", action="store_true",
                   help="replace another data set's build in --output (its shards are deleted)")
    return p


def main(argv: list[str] | None = None) -> int:
    """`megamod build-shards`: 0 on success, 2 (one-line message on stderr) on bad input."""
    args = _parser().parse_args(argv)
    start = time.perf_counter()
    try:
        manifest = build_shards(
            args.format, args.annotations, args.images, args.output, name=args.name,
            shard_size=args.shard_size, shard_bytes=args.shard_bytes, max_samples=args.max_samples,
            workers=args.workers, max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels,
            force=args.force,
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the finished shards are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    skipped = ", ".join(f"{reason} {n}" for reason, n in sorted(manifest["skipped"].items())) or "none"
    print(f"{manifest['samples']} samples in {len(manifest['shards'])} shards in {args.output} "
          f"({time.perf_counter() - start:.1f} s); skipped: {skipped}")
    for note in manifest["notes"]:
        print(f"note: {note}", file=sys.stderr)
    return 0
