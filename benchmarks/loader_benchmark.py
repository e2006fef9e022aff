"""Loader benchmark: images/s of DALI (CPU, and GPU "mixed" when there is one) vs the
pure-Python path (Pillow + numpy) on the same shards, in one run; prints the ratios.

    python benchmarks/loader_benchmark.py [--shards DIR|GLOB] [--image-size 336] [--workers 2]

Two measurements per decoder, same images in the same order:
- decode: encoded bytes -> CLIP-preprocessed [n, 3, S, S] (what the decoder choice changes),
  in batches of --batch images, the way the loader hands a step's images over;
- loader: whole steps from `TrainLoader` (read, tokenise, decode, collate), no prefetch.
Default shards: the bundled tiny data set (photos of up to 512 px, as LLaVA's), built into
a temporary folder.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from megamod.config import load_config
from megamod.data.decode import PythonImageDecoder
from megamod.data.loader import build_train_loader, prepare_tiny_shards
from megamod.data.reader import open_source
from megamod.data.tokenizer import load_tokenizer


def shard_images(spec: str, count: int) -> list[tuple[str, bytes]]:
    """`count` image members read from the shards, cycling through them."""
    source = open_source(spec, "--shards")
    images = []
    for i in range(len(source)):
        members = source.read(i).members
        images += [(name, data) for name, data in members.items() if name.startswith("img")]
    return [images[i % len(images)] for i in range(count)]


def decode_rate(decoder, images: list[tuple[str, bytes]], batch: int) -> float:
    decoder(images[:batch])  # warm-up: pipeline start, allocations
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        decoder(images[i : i + batch])
    return len(images) / (time.perf_counter() - start)


def loader_rate(shards: str, decoder: str, args: argparse.Namespace) -> float:
    config = load_config(None, [
        f"data.train_shards={shards}", f"data.image_decoder={decoder}", f"data.num_workers={args.workers}",
        "data.prefetch_steps=0", "data.conversation_template=vicuna_v1",
        f"model.vision.image_size={args.image_size}", "model.vision.patch_size=14",
        "model.language.seq_length=4096", f"train.global_batch_size={args.batch}", "train.micro_batch_size=1",
    ])
    with build_train_loader(config, load_tokenizer("tiny"), 0, 1) as loader:
        loader.next_step()
        images, start = 0, time.perf_counter()
        for _ in range(args.steps):
            images += sum(len(mb["images"]) for mb in loader.next_step())
        return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", help="shard folder, glob or brace pattern (default: the tiny data set)")
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--aspect", choices=["pad", "resize"], default="pad")
    parser.add_argument("--workers", type=int, default=2, help="Pillow threads = DALI threads")
    parser.add_argument("--batch", type=int, default=32, help="images per decode call; samples per loader step")
    parser.add_argument("--images", type=int, default=512, help="images per decode measurement")
    parser.add_argument("--steps", type=int, default=8, help="loader steps per measurement")
    args = parser.parse_args()

    from megamod.data.decode import DaliImageDecoder  # the benchmark compares against it: required

    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or str(prepare_tiny_shards(Path(tmp)))
        images = shard_images(shards, args.images)
        print(f"{len(images)} images from {shards}, {args.image_size} px ({args.aspect}), "
              f"{args.workers} threads, batches of {args.batch}")
        with ThreadPoolExecutor(args.workers) as pool:
            python = PythonImageDecoder(args.image_size, args.aspect, pool)
            rates = {"python": decode_rate(python, images, args.batch)}
            dali_cpu = DaliImageDecoder(args.image_size, args.aspect, args.workers, python)
            rates["dali-cpu"] = decode_rate(dali_cpu, images, args.batch)
            if torch.cuda.is_available():
                mixed = DaliImageDecoder(args.image_size, args.aspect, args.workers, python, device_id=0)
                rates["dali-mixed"] = decode_rate(mixed, images, args.batch)
        for name, rate in rates.items():
            print(f"decode  {name:10s} {rate:8.1f} images/s  ({rate / rates['python']:.2f}x python)")
        auto = "dali-mixed" if torch.cuda.is_available() else "dali-cpu"
        loader = {"python": loader_rate(shards, "python", args), auto: loader_rate(shards, "dali", args)}
        for name, rate in loader.items():
            print(f"loader  {name:10s} {rate:8.1f} images/s  ({rate / loader['python']:.2f}x python)")


if __name__ == "__main__":
    main()
