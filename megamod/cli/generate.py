"""`megamod generate`: answer a prompt about images with a trained checkpoint.

    megamod generate --checkpoint SAVE_DIR --image FILE [--image FILE ...] --prompt TEXT
        [--max-new-tokens N] [--temperature T] [--seed S] [--json]

One process; p-MoD layers cache only the tokens they keep (`megamod.inference`). The
prompt and its new tokens must fit the model's `model.language.seq_length`, and images
the checkpoint config's `data.max_image_bytes` / `data.max_image_pixels`: anything else
exits 2 naming the argument and the limit (`megamod.inference.generate`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

from megamod.data.tokenizer import IMAGE_TOKEN
from megamod.errors import DataError, MegamodError
from megamod.training.logging import silence_upstream_warnings


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megamod generate",
        description="Answer a prompt about images with a trained checkpoint (one process; "
        "p-MoD layers cache only the tokens they keep).",
    )
    p.add_argument("--checkpoint", required=True, help="a training run's checkpoint.save_dir")
    p.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    p.add_argument("--prompt", required=True, help=f"the question; {IMAGE_TOKEN} marks where an image goes")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="the prompt and the new tokens must fit the model's model.language.seq_length "
                   "(default: up to 64, as room allows)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--seed", type=int, default=0, help="for sampling at temperature > 0")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise MegamodError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise MegamodError(f"--temperature={args.temperature} must be a number >= 0 (0 is greedy)")
    for path in map(Path, args.image):
        if path.is_dir():
            raise DataError(f"--image {path} is a folder: give an image file")
        if not path.is_file():
            what = "is not a regular file" if path.exists() else "does not exist"
            raise DataError(f"--image {path} {what}: give an image file")
    silence_upstream_warnings()  # before megatron-core is imported
    from megamod.inference.generate import new_tokens_budget, open_generator, prompt_tokens

    with open_generator(args.checkpoint) as generator:
        ids, images = prompt_tokens(generator, args.prompt, args.image)
        max_new_tokens = new_tokens_budget(generator, len(ids), args.max_new_tokens)
        start = time.perf_counter()
        result = generator.generate([ids], images, max_new_tokens, args.temperature, seed=args.seed)
        seconds = time.perf_counter() - start
    text = generator.tokenizer.decode(result.tokens[0], skip_special_tokens=True)
    if args.json:
        print(json.dumps({
            "text": text, "tokens": result.tokens[0], "prompt_tokens": result.prompt_tokens,
            "kv_cache_bytes": result.cache_bytes, "kv_cache_bytes_dense": result.dense_cache_bytes,
            "seconds": round(seconds, 3),
        }))
    else:
        print(text)
        print(
            f"[{result.prompt_tokens} prompt + {len(result.tokens[0])} new tokens in {seconds:.2f} s; "
            f"KV cache {result.cache_bytes / 2**20:.2f} MiB, "
            f"{result.cache_bytes / max(result.dense_cache_bytes, 1):.1%} of every layer caching every token]",
            file=sys.stderr,
        )
    return 0
