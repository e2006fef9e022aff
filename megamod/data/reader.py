"""Indexed access to shards and the global sample order: what the loader reads, and when.

- `open_source(spec)` resolves `data.train_shards` (or one `data.mixture` source): a
  directory with the builder's `manifest.json`, a glob of .tar files, a brace pattern
  (`dir/name-{000000..000009}.tar`), or "tiny" (the bundled data set's shards in
  `TINY_CACHE_DIR`), into a `Source`: its shards and their sample counts.
- `Source.read(i)` returns sample i's tar members (json and images, as stored) by random
  access: a sample's members are contiguous in the tar, so one `os.pread` of its byte range
  reads them, headers included. The ranges come from the DALI `.idx` file the builder
  writes beside each shard (`wds2idx`: per sample, each member's extension, data offset and
  size; the builder's USTAR headers are the 512 bytes before each member's data); a shard
  without one is scanned once with `tarfile`. Kept per shard as two int64 arrays, 16 bytes
  a sample, so a 665k-sample mix indexes in ~10 MB per rank. A shard shorter than its
  manifest entry or its index says (a copy cut short) is a DataError naming it, at
  `open_source` where the manifest is there to compare with, else at its first read.
- `SampleOrder` maps each position of the global sample stream to (source, k), k counting
  the draws from that source, and a source's k-th draw to a sample index through per-epoch
  seeded permutations. Mixture positions come in blocks of `MIXTURE_BLOCK` holding each
  source a fixed number of times (its weight's share, rounded), shuffled per block with
  the seed: a source's k before any position is closed-form (whole blocks) plus one
  cached block, so a resumed run finds its place in O(block), not O(steps).
"""

from __future__ import annotations

import functools
import glob
import json
import os
import tarfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import braceexpand
import numpy as np

from megamod.data.shards import MANIFEST
from megamod.errors import ConfigError, DataError

# Where `megamod.data.loader.prepare_tiny_shards` builds the bundled data set's shards.
TINY_CACHE_DIR = Path.home() / ".cache" / "megamod" / "tiny"
MIXTURE_BLOCK = 10_000  # weights are realised to 1 / MIXTURE_BLOCK of the stream

_BLOCK = 512  # tar header and padding unit

# Per shard: each sample's byte range [start, end), from its first member's header to the
# end of its last member's data.
ShardIndex = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Shard:
    path: Path
    nsamples: int
    index: Path | None  # the DALI .idx file, if there is one


@dataclass
class RawSample:
    """One sample's tar members as stored: `members["json"]`, `members["img0.jpg"]` ..."""

    key: str
    where: str  # "SHARD.tar:KEY", for messages
    members: dict[str, bytes]


def read_dali_index(path: Path) -> ShardIndex | None:
    """Parses a `wds2idx` file (v1.2: a header "v1.2 N", then per sample groups of
    `ext offset size name`); None if it is in a format this does not know."""
    lines = path.read_text().splitlines()
    if not lines or lines[0].split()[:1] != ["v1.2"]:
        return None
    starts, ends = [], []
    for line in lines[1:]:
        fields = line.split()
        if not fields or len(fields) % 4:
            return None
        offsets, sizes = [int(f) for f in fields[1::4]], [int(f) for f in fields[2::4]]
        starts.append(min(offsets) - _BLOCK)
        ends.append(max(o + n for o, n in zip(offsets, sizes)))
    return np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)


def _damaged(path: Path, what: str) -> DataError:
    return DataError(
        f"shard {path} is truncated or damaged ({what}): copy it again, or rebuild its data set "
        "with megamod build-shards"
    )


def scan_tar(path: Path) -> ShardIndex:
    """The sample ranges of a shard without an .idx file (headers only: data is skipped)."""
    keys, starts, ends = [], [], []
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key = member.name.partition(".")[0]
                if not keys or keys[-1] != key:
                    keys.append(key)
                    starts.append(member.offset)
                    ends.append(0)
                ends[-1] = member.offset_data + member.size
    except tarfile.TarError as e:
        raise _damaged(path, f"tarfile: {e}") from None
    return np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)


def split_members(blob: bytes) -> tuple[str, dict[str, bytes]]:
    """The key and members ({extension: bytes}) of one sample's tar bytes; stops at a
    corrupt header (the sample then lacks members and is skipped)."""
    key, members, pos = "", {}, 0
    while pos + _BLOCK <= len(blob):
        try:
            info = tarfile.TarInfo.frombuf(blob[pos : pos + _BLOCK], "utf-8", "surrogateescape")
        except tarfile.HeaderError:
            break
        pos += _BLOCK
        if info.isfile():
            key, _, ext = info.name.partition(".")
            members[ext] = blob[pos : pos + info.size]
        pos += -(-info.size // _BLOCK) * _BLOCK
    return key, members


class Source:
    """The samples of one data set's shards, readable by index from any thread."""

    def __init__(self, spec: str, shards: list[Shard]):
        self.spec = spec
        self.shards = shards
        self._starts = np.cumsum([0] + [s.nsamples for s in shards])
        self._indexes: dict[int, ShardIndex] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _index(self, shard_id: int) -> ShardIndex:
        with self._lock:  # one reader builds a shard's index; the others wait for it
            if shard_id not in self._indexes:
                shard = self.shards[shard_id]
                index = read_dali_index(shard.index) if shard.index else None
                index = index if index is not None else scan_tar(shard.path)
                if len(index[0]) != shard.nsamples:
                    raise DataError(
                        f"{shard.path}: holds {len(index[0])} samples but its manifest says {shard.nsamples}: "
                        "the shard or its .idx file changed after the build; rebuild with megamod build-shards"
                    )
                size = shard.path.stat().st_size
                if len(index[1]) and index[1][-1] > size:  # where no manifest had its size
                    raise _damaged(shard.path, f"{size} bytes, its samples need {index[1][-1]}")
                self._indexes[shard_id] = index
            return self._indexes[shard_id]

    def read(self, i: int) -> RawSample:
        shard_id = int(np.searchsorted(self._starts, i, side="right")) - 1
        shard = self.shards[shard_id]
        starts, ends = self._index(shard_id)
        j = i - self._starts[shard_id]
        with open(shard.path, "rb", buffering=0) as f:
            blob = os.pread(f.fileno(), int(ends[j] - starts[j]), int(starts[j]))
        if len(blob) < ends[j] - starts[j]:  # cut since it was opened
            raise _damaged(shard.path, f"its sample {j} ends past the end of the file")
        key, members = split_members(blob)
        return RawSample(key, f"{shard.path.name}:{key or f'sample {j}'}", members)


def _manifest_shards(directory: Path, field: str) -> list[Shard]:
    manifest_path = directory / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise DataError(
            f"{field}: {directory} has no {MANIFEST}: the build is unfinished or this is not a shard "
            "folder; rerun megamod build-shards, or pass a glob of .tar files"
        ) from None
    except (OSError, ValueError) as e:
        raise DataError(f"{field}: cannot read {manifest_path} ({e}); rerun megamod build-shards") from None
    return [_manifest_shard(directory, entry, field) for entry in manifest["shards"]]


def _manifest_shard(directory: Path, entry: dict, field: str) -> Shard:
    """The shard of a manifest entry, once its file is checked to be the size recorded."""
    path = directory / entry["url"]
    size = path.stat().st_size if path.is_file() else -1
    if size != entry["bytes"]:
        raise DataError(
            f"{field}: {path} is missing or not the size {MANIFEST} records ({size} != {entry['bytes']} "
            "bytes: truncated or damaged): copy the shard folder again or rebuild it with megamod build-shards"
        )
    idx = directory / entry.get("index", "-")
    return Shard(path, entry["nsamples"], idx if idx.is_file() else None)


def _tar_shard(path: Path, field: str) -> Shard:
    """A shard named by a glob or brace pattern: its count from the manifest beside it, else
    from its .idx file or a scan."""
    idx = path.with_suffix(".idx")
    idx = idx if idx.is_file() else None
    try:
        manifest = json.loads((path.parent / MANIFEST).read_text())
        entry = next(e for e in manifest["shards"] if e["url"] == path.name)
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        entry = None
    if entry is not None:
        return _manifest_shard(path.parent, entry, field)
    index = read_dali_index(idx) if idx else None
    return Shard(path, len((index if index is not None else scan_tar(path))[0]), idx)


def open_source(spec: str, field: str, tiny_dir: Path = TINY_CACHE_DIR / "shards") -> Source:
    """Resolves a shard spec (see the module docstring; "tiny" is `tiny_dir`) into a Source.

    Raises DataError naming `field` (the config key) when nothing usable is found.
    """
    if spec == "tiny":
        if not (tiny_dir / MANIFEST).is_file():
            raise DataError(
                f"{field}=tiny: the bundled data set's shards are not in {tiny_dir}: "
                "megamod.data.loader.prepare_tiny_shards() builds them (the training loop calls it)"
            )
        spec = str(tiny_dir)
    if Path(spec).is_dir():
        shards = _manifest_shards(Path(spec), field)
    else:
        paths = []
        for pattern in braceexpand.braceexpand(spec):
            matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
            paths += [Path(m) for m in matches if Path(m).is_file()]
        if not paths:
            raise DataError(
                f"{field}={spec!r} matches no shard files: give a folder with {MANIFEST}, "
                "a glob (dir/*.tar) or a brace pattern (dir/name-{000000..000009}.tar)"
            )
        shards = [_tar_shard(p, field) for p in paths]
    source = Source(spec, [s for s in shards if s.nsamples > 0])
    if len(source) == 0:
        raise DataError(f"{field}={spec!r} holds no samples")
    return source


def apportion(total: int, weights: Sequence[float]) -> np.ndarray:
    """Integer counts summing to `total`, proportional to `weights` (largest remainders)."""
    exact = np.asarray(weights, dtype=np.float64) / np.sum(weights) * total
    counts = np.floor(exact).astype(np.int64)
    # Stable sort: equal remainders go to the earlier source.
    counts[np.argsort(-(exact - counts), kind="stable")[: total - counts.sum()]] += 1
    return counts


class SampleOrder:
    """The global sample stream over one or more sources (see the module docstring)."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], seed: int):
        self.sizes, self.seed = list(sizes), seed
        self.counts = apportion(MIXTURE_BLOCK, weights)
        if len(sizes) > 1 and self.counts.min() == 0:
            i = int(np.argmin(self.counts))
            raise ConfigError(
                f"data.mixture[{i}].weight={weights[i]} is under 1/{MIXTURE_BLOCK} of the total weight: "
                "raise it or drop the source"
            )
        self._template = np.repeat(np.arange(len(sizes)), self.counts)
        self._block = functools.lru_cache(maxsize=4)(self._make_block)
        self._permutation = functools.lru_cache(maxsize=2 * len(sizes) + 2)(self._make_permutation)

    def _make_block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """The sources of one block's positions, and each position's draw number in the block."""
        slots = np.random.default_rng([self.seed, 1, block]).permutation(self._template)
        draw = np.empty_like(slots)
        for s in range(len(self.sizes)):
            mine = np.flatnonzero(slots == s)
            draw[mine] = np.arange(len(mine))
        return slots, draw

    def _make_permutation(self, source: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 0, source, epoch]).permutation(self.sizes[source])

    def locate(self, position: int) -> tuple[int, int]:
        """(source, k): position `position` of the stream is the source's k-th draw."""
        if len(self.sizes) == 1:
            return 0, position
        block, offset = divmod(position, MIXTURE_BLOCK)
        slots, draw = self._block(block)
        source = int(slots[offset])
        return source, block * int(self.counts[source]) + int(draw[offset])

    def sample(self, source: int, k: int) -> int:
        """The sample index of a source's k-th draw: epoch k // size, in that epoch's permutation."""
        epoch, offset = divmod(k, self.sizes[source])
        return int(self._permutation(source, epoch)[offset])
