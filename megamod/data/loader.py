"""Micro-batches for the training loop, read from WebDataset shards in a global, resumable order.

`build_train_loader(config, tokenizer, dp_rank, dp_size).next_step()` returns this
data-parallel rank's micro-batches for one optimizer step:
`{"tokens", "labels" (shifted, IGNORE_INDEX where no loss), "loss_mask", "padding_mask"
(True where a row holds no sample), "images"}`, the images `[n, 3, S, S]` in the order of
their `<image>` runs, row by row. Rows are as long as `data.padding` says: the longest
sample of the micro-batch rounded up to `data.pad_to_multiple` (and to the TP size under
sequence parallelism), or `model.language.seq_length`.

Packing (`data.packing`): a step is `global_batch_size` rows of `seq_length`, filled with
whole samples first-fit in the global order: each sample goes into the first row with room
for it, and the step ends at the first sample that fits in none (it opens the next step).
Every rank packs the whole step (it reads and tokenises every sample of it, and decodes the
images of its own rows only), so the rows do not depend on the DP size, and the data
position stays a count of samples. Packed batches add `position_ids` (restarting at 0 in
each sample) and `segment_ids` (the sample's number in its row, -1 on padding). A sample
whose image cannot be decoded leaves its row (its tokens become padding) instead of being
replaced: a replacement might not fit.

Order (`megamod.data.reader.SampleOrder`): one global stream of sample positions over all
sources, seeded by `data.seed`; a step consumes the next `global_batch_size` positions and
DP rank r takes the r-th contiguous slice, so the order does not depend on the DP size and
TP/EP ranks of one DP group build identical batches with nothing broadcast. `state_dict()`
is the position (`consumed_samples`): a resumed run sees exactly the samples an
uninterrupted one would.

Per step: the members of each sample are read in a thread pool (`data.num_workers`), the
json is parsed and tokenised (`encode_conversation`) here, and all the step's images are
decoded and CLIP-preprocessed in one batch (`megamod.data.decode`: DALI when installed,
else Pillow in the pool). A background thread prepares
`data.prefetch_steps` steps ahead; `last_wait` is how long the latest `next_step()`
blocked, for `data/wait_fraction`.

Bad samples (an image no decoder reads, a conversation `encode_conversation` rejects, no
trained token left after truncation) are replaced by the source's next draws, so shapes
and resumption stay exact; each is logged once with its shard and key and counted in
`counts.skipped`. Above `data.max_skip_fraction` of the samples read, a DataError stops
the run.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import queue
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megamod.config import Config
from megamod.data.conversation import IGNORE_INDEX, EncodedSample, encode_conversation
from megamod.data.decode import make_image_decoder
from megamod.data.reader import TINY_CACHE_DIR, RawSample, SampleOrder, Source, open_source
from megamod.data.shards import build_shards
from megamod.data.tiny import write_tiny_dataset
from megamod.data.tokenizer import Tokenizer
from megamod.errors import DataError

logger = logging.getLogger("megamod")

MAX_REPLACEMENTS = 100  # unusable draws in a row for one position before giving up

def prepare_tiny_shards(cache_dir: Path = TINY_CACHE_DIR) -> Path:
    """Writes the bundled tiny data set and builds its shards under `cache_dir`; returns
    the shard folder. Idempotent: an up-to-date build is reused (the builder's resume).
    Concurrent callers (one per node, a shared home) take turns on a lock file; readers
    must wait for it (one call per node, then a barrier)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        json_path = write_tiny_dataset(cache_dir / "src")
        out = cache_dir / "shards"
        build_shards("llava", json_path, json_path.parent, out, name="tiny", shard_size=16, workers=0, progress=False)
    return out


def collate(samples: Sequence[_Prepared], width: int) -> dict[str, torch.Tensor]:
    """One sample a row, each cut to `width` (its padding beyond its length)."""
    labels = torch.from_numpy(np.stack([s.encoded.labels[:width] for s in samples]))
    lengths = torch.tensor([s.encoded.length for s in samples])
    return {
        "tokens": torch.from_numpy(np.stack([s.encoded.tokens[:width] for s in samples])),
        "labels": labels,
        "loss_mask": labels != IGNORE_INDEX,
        "padding_mask": torch.arange(width).unsqueeze(0) >= lengths.unsqueeze(1),
        "images": torch.from_numpy(np.concatenate([s.pixels for s in samples])),
    }


def collate_packed(
    rows: Sequence[Sequence[_Prepared]], width: int, pad_id: int, image_size: int
) -> dict[str, torch.Tensor]:
    """Several samples a row, in the order they were packed; the rest of a row is padding
    (its own segment, -1, so that no row of the attention mask is empty)."""
    shape = (len(rows), width)
    tokens = np.full(shape, pad_id, dtype=np.int64)
    labels = np.full(shape, IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros(shape, dtype=np.int64)
    segments = np.full(shape, -1, dtype=np.int64)
    images = []
    for r, row in enumerate(rows):
        start = 0
        for j, sample in enumerate(row):
            n = sample.encoded.length
            tokens[r, start : start + n] = sample.encoded.tokens[:n]
            labels[r, start : start + n] = sample.encoded.labels[:n]
            positions[r, start : start + n] = np.arange(n)
            segments[r, start : start + n] = j
            images.append(sample.pixels)
            start += n
    labels_t = torch.from_numpy(labels)
    segments_t = torch.from_numpy(segments)
    return {
        "tokens": torch.from_numpy(tokens),
        "labels": labels_t,
        "loss_mask": labels_t != IGNORE_INDEX,
        "padding_mask": segments_t < 0,
        "position_ids": torch.from_numpy(positions),
        "segment_ids": segments_t,
        # Rows can be left without images (text-only samples, or every image refused).
        "images": torch.from_numpy(np.concatenate(images or [np.zeros((0, 3, image_size, image_size), np.float32)])),
    }


def pack_first_fit(lengths: Sequence[int], rows: int, row_length: int) -> list[list[int]]:
    """Samples (by their index in `lengths`, the stream order) placed first-fit into `rows`
    rows of `row_length`: each into the first row with room for it. Stops at the first
    sample that fits in no row; the samples placed are a prefix of the stream."""
    room = [row_length] * rows
    placed: list[list[int]] = [[] for _ in range(rows)]
    for i, length in enumerate(lengths):
        row = next((r for r in range(rows) if room[r] >= length), None)
        if row is None:
            break
        room[row] -= length
        placed[row].append(i)
    return placed


class _BadSample(Exception):
    """Why a sample cannot be used."""


class _NoAnswerLeft(_BadSample):
    """Truncation at model.language.seq_length left the sample no trained token."""


@dataclass
class _Prepared:
    """A usable sample for one stream position: the source's draw k + `attempt`."""

    source: int
    k: int
    attempt: int
    index: int
    where: str
    encoded: EncodedSample
    images: list[tuple[str, bytes]]  # the members of the images its tokens hold
    pixels: np.ndarray | None = None  # float32 [len(images), 3, S, S], once decoded


@dataclass(frozen=True)
class DataCounts:
    """This rank's running counts (not checkpointed: they describe this run's reading)."""

    seen: int = 0  # samples read (usable or not)
    skipped: int = 0  # unusable ones among them (each replaced by another draw)
    truncated: int = 0  # used ones cut to model.language.seq_length


@dataclass
class _Counts:
    """DataCounts while a step is being built."""

    seen: int
    skipped: int
    truncated: int

    def frozen(self) -> DataCounts:
        return DataCounts(self.seen, self.skipped, self.truncated)

    def add(self, other: _Counts) -> None:
        self.seen += other.seen
        self.skipped += other.skipped
        self.truncated += other.truncated


def step_fingerprint(batches: Sequence[dict[str, torch.Tensor]]) -> list[int]:
    """What tells two ranks' builds of one step apart: a digest of every tensor but the
    images, and the images' fp64 sum and norm as int64 bits (hashing ~100 MB of pixels a
    step would take ~0.1 s; another decoder's interpolation changes both)."""
    digest = hashlib.blake2b(digest_size=7)  # 56 bits: a non-negative int64
    for batch in batches:
        for key in sorted(k for k in batch if k != "images"):
            digest.update(batch[key].contiguous().numpy().tobytes())
    pixels = torch.stack([torch.stack([b["images"].sum(dtype=torch.float64),
                                       torch.linalg.vector_norm(b["images"], dtype=torch.float64)])
                          for b in batches]).sum(0)
    return [int.from_bytes(digest.digest(), "little"), *pixels.view(torch.int64).tolist()]


@dataclass
class _Step:
    batches: list[dict[str, torch.Tensor]]
    counts: DataCounts  # up to and including this step
    samples: int  # samples of the global stream the step consumed (all DP ranks)
    # `step_fingerprint(batches)`, taken here in the loader's thread, off the training loop's.
    fingerprint: list[int] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.fingerprint = step_fingerprint(self.batches)
        # On a GPU machine, page-locked host memory, so that the loop's non-blocking copies
        # to the GPU overlap its compute; pinned here, in the loader's thread.
        if torch.cuda.is_available():
            self.batches = [{k: v.pin_memory() for k, v in b.items()} for b in self.batches]


class TrainLoader:
    """Resumable, DP-sharded micro-batches over shard sources (see the module docstring)."""

    def __init__(
        self,
        sources: list[Source],
        weights: list[float],
        config: Config,
        tokenizer: Tokenizer,
        dp_rank: int,
        dp_size: int,
    ) -> None:
        train, data = config.train, config.data
        if train.global_batch_size % (train.micro_batch_size * dp_size):
            raise ValueError("global batch must split into micro-batches on every DP rank")
        self.sources, self.weights = sources, weights
        self.order = SampleOrder([len(s) for s in sources], weights, data.seed)
        self.global_batch_size, self.micro_batch_size = train.global_batch_size, train.micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed = data.seed
        self.template, self.tokenizer = data.conversation_template, tokenizer
        self.image_size = config.model.vision.image_size
        self.num_image_tokens = config.model.vision.num_patches
        self.seq_length = config.model.language.seq_length
        self.packing, self.padding, self.group_by_length = data.packing, data.padding, data.group_by_length
        parallel = config.parallel
        tp = parallel.tensor_model_parallel_size if parallel.sequence_parallel else 1
        self.pad_to_multiple = math.lcm(data.pad_to_multiple, tp)
        self.prefetch_steps = data.prefetch_steps
        self.max_skip_fraction = data.max_skip_fraction
        # Below this many samples read, a few early bad ones would make a noisy fraction.
        self.min_seen = math.ceil(10 / data.max_skip_fraction) if data.max_skip_fraction > 0 else 0
        self._pool = ThreadPoolExecutor(data.num_workers, thread_name_prefix="megamod-data")
        try:
            self.decoder = make_image_decoder(
                data.image_decoder, self.image_size, data.image_aspect_ratio, self._pool, data.num_workers,
                max_pixels=data.max_image_pixels, max_bytes=data.max_image_bytes,
            )
        except BaseException:
            self._pool.shutdown()
            raise

        self.consumed_samples = 0
        self.counts = DataCounts()  # for the steps returned so far
        self.last_wait = 0.0  # seconds the latest next_step() blocked
        self.last_step_samples = 0  # samples the latest step consumed (all DP ranks)
        self.last_fingerprint: list[int] = []  # `step_fingerprint` of the latest step
        # Packing reads past a step's end to find it: those samples, prepared, by position,
        # for the next step (filled and read by whichever thread builds steps).
        self._lookahead: dict[int, tuple[_Prepared, _Counts]] = {}
        self._bad: dict[tuple[int, int], str] = {}  # (source, index) -> reason, logged once
        self._bad_kind: dict[tuple[int, int], type[_BadSample]] = {}
        self._skips_by_source: Counter[int] = Counter()
        self._producer: tuple[threading.Thread, threading.Event, queue.Queue] | None = None

    # -------------------------------------------------------------- the loop's interface

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches for the next optimizer step."""
        start = time.perf_counter()
        if self.prefetch_steps == 0:
            step = self._build_step(self.consumed_samples, self.counts)
        else:
            if self._producer is None:
                self._start_producer()
            step = self._producer[2].get()
            if isinstance(step, BaseException):
                self._stop_producer()
                raise step
        self.last_wait = time.perf_counter() - start
        self.consumed_samples += step.samples
        self.last_step_samples = step.samples
        self.last_fingerprint = step.fingerprint
        self.counts = step.counts
        return step.batches

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_samples": self.consumed_samples, "order": self._order_description()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._stop_producer()
        self._lookahead.clear()
        self.consumed_samples = int(state["consumed_samples"])
        saved = state["order"]
        if saved != self._order_description():
            logger.warning(
                f"data: the sources, their sizes or weights, or data.seed differ from the checkpoint's "
                f"({saved} -> {self._order_description()}): resuming at sample position "
                f"{self.consumed_samples} of a different order"
            )

    def close(self) -> None:
        self._stop_producer()
        self._pool.shutdown()

    def __enter__(self) -> TrainLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _order_description(self) -> dict[str, Any]:
        return {"seed": self.seed, "sources": [[len(s), w] for s, w in zip(self.sources, self.weights)]}

    # ------------------------------------------------------------------------ prefetch

    def _start_producer(self) -> None:
        stop, steps = threading.Event(), queue.Queue(self.prefetch_steps)
        args = (stop, steps, self.consumed_samples, self.counts)
        thread = threading.Thread(target=self._produce, args=args, daemon=True,
                                  name="megamod-data-prefetch")
        self._producer = (thread, stop, steps)
        thread.start()

    def _stop_producer(self) -> None:
        if self._producer is not None:
            thread, stop, _ = self._producer
            stop.set()
            thread.join()
            self._producer = None

    def _produce(self, stop: threading.Event, steps: queue.Queue, position: int, counts: DataCounts) -> None:
        try:
            while True:
                item = self._build_step(position, counts)
                position, counts = position + item.samples, item.counts
                if not self._put(stop, steps, item):
                    return
        except BaseException as e:  # handed to the loop, which raises it
            self._put(stop, steps, e)

    @staticmethod
    def _put(stop: threading.Event, steps: queue.Queue, item: object) -> bool:
        while not stop.is_set():
            try:
                steps.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    # ------------------------------------------------------------------ building a step

    def _build_step(self, position: int, counts_before: DataCounts) -> _Step:
        counts = _Counts(counts_before.seen, counts_before.skipped, counts_before.truncated)
        if self.packing:
            return self._build_packed_step(position, counts)
        per_rank = self.global_batch_size // self.dp_size
        first = position + self.dp_rank * per_rank
        samples = self._prepare_many(range(first, first + per_rank), counts)
        self._decode(samples, counts)
        self._check_skip_fraction(counts)
        if self.group_by_length:  # stable: equal lengths keep the stream order
            samples.sort(key=lambda sample: -sample.encoded.length)
        mbs = self.micro_batch_size
        batches = []
        for i in range(0, per_rank, mbs):
            group = samples[i : i + mbs]
            batches.append(collate(group, self._width(max(s.encoded.length for s in group))))
        return _Step(batches, counts.frozen(), self.global_batch_size)

    def _width(self, longest: int) -> int:
        """Row length for a micro-batch whose longest sample has `longest` tokens."""
        if self.padding == "max_length":
            return self.seq_length
        return min(self.seq_length, math.ceil(longest / self.pad_to_multiple) * self.pad_to_multiple)

    def _build_packed_step(self, position: int, counts: _Counts) -> _Step:
        """The step's rows from the stream at `position` (see the module docstring); this
        rank's rows are decoded and counted, the others only packed."""
        rows, mbs = self.global_batch_size, self.micro_batch_size
        candidates: list[tuple[_Prepared, _Counts]] = []
        while True:  # read in chunks of a step's rows until a sample fits in no row
            chunk = range(position + len(candidates), position + len(candidates) + rows)
            ahead = [p for p in chunk if p in self._lookahead]
            candidates += [self._lookahead.pop(p) for p in ahead]
            candidates += self._prepare_counted(chunk[len(ahead):])
            placed = pack_first_fit([c.encoded.length for c, _ in candidates], rows, self.seq_length)
            consumed = sum(len(row) for row in placed)
            if consumed < len(candidates):
                break
        self._lookahead = {position + i: candidates[i] for i in range(consumed, len(candidates))}
        per_rank = rows // self.dp_size
        mine = placed[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]
        for row in mine:
            for i in row:
                counts.add(candidates[i][1])
        own = [[candidates[i][0] for i in row] for row in mine]
        failed = self._decode([s for row in own for s in row], counts, replace=False)
        own = [[s for s in row if id(s) not in failed] for row in own]
        self._check_skip_fraction(counts)
        batches = [collate_packed(own[i : i + mbs], self.seq_length, self.tokenizer.pad_id, self.image_size)
                   for i in range(0, per_rank, mbs)]
        return _Step(batches, counts.frozen(), consumed)

    def _prepare_counted(self, positions: Sequence[int]) -> list[tuple[_Prepared, _Counts]]:
        """The usable samples at stream positions, each with what finding it cost (its own
        counts: a packed step counts only its own rows' samples)."""
        counts = [_Counts(0, 0, 0) for _ in positions]
        return list(zip(self._prepare_many(positions, counts), counts))

    def _prepare_many(self, positions: Sequence[int], counts: _Counts | list[_Counts]) -> list[_Prepared]:
        """The usable samples at stream positions, their first draws read in the pool; counted
        in `counts` (one for all, or one each)."""
        draws = [self.order.locate(p) for p in positions]
        raws = self._pool.map(lambda d: self._read(d[0], self.order.sample(*d)), draws)
        each = counts if isinstance(counts, list) else [counts] * len(draws)
        return [self._prepare(source, k, 0, c, raw) for (source, k), raw, c in zip(draws, raws, each)]

    def _read(self, source: int, index: int) -> RawSample | None:
        """The sample's members, or None if it is known to be bad (not read again)."""
        return None if (source, index) in self._bad else self.sources[source].read(index)

    def _prepare(self, source: int, k: int, first: int, counts: _Counts, raw: RawSample | None = None) -> _Prepared:
        """The first usable sample among the source's draws k + first, k + first + 1, ...
        (`raw`: draw k + first, already read)."""
        last: _BadSample | None = None
        for attempt in range(first, first + MAX_REPLACEMENTS):
            index = self.order.sample(source, k + attempt)
            if raw is None:
                raw = self._read(source, index)
            counts.seen += 1
            try:
                if raw is None:  # known bad: not read again, the same reason
                    raise self._bad_kind.get((source, index), _BadSample)(self._bad[source, index])
                encoded, images = self._encode(raw)
                counts.truncated += encoded.truncated
                return _Prepared(source, k, attempt, index, raw.where, encoded, images)
            except _BadSample as e:
                self._skip(source, index, raw, str(e), counts)
                self._bad_kind.setdefault((source, index), type(e))
                last = e
            raw = None
        if isinstance(last, _NoAnswerLeft):  # the length is wrong, not the data
            raise DataError(
                f"data: {MAX_REPLACEMENTS} samples in a row of {self.sources[source].spec} keep no "
                f"answer token within model.language.seq_length={self.seq_length} (an image alone "
                f"takes {self.num_image_tokens} tokens): raise model.language.seq_length"
            )
        raise DataError(
            f"data: {MAX_REPLACEMENTS} unusable samples in a row in {self.sources[source].spec} "
            f"(e.g. {self._bad[source, index]}): the data set is broken; rebuild it with megamod build-shards"
        )

    def _encode(self, raw: RawSample) -> tuple[EncodedSample, list[tuple[str, bytes]]]:
        try:
            doc = json.loads(raw.members["json"])
            turns, names = doc["conversations"], doc.get("images", [])
        except (KeyError, TypeError, ValueError) as e:
            raise _BadSample(f"no valid json member ({type(e).__name__}: {e})") from None
        if not isinstance(turns, list) or not isinstance(names, list):
            raise _BadSample("'conversations' or 'images' is not a list")
        try:
            encoded = encode_conversation(turns, self.template, self.tokenizer, self.num_image_tokens, self.seq_length)
        except DataError as e:
            raise _BadSample(str(e)) from None
        if not (encoded.labels != IGNORE_INDEX).any():
            raise _NoAnswerLeft(f"no answer token left within model.language.seq_length={self.seq_length}")
        if encoded.num_images > len(names):
            raise _BadSample(f"more <image> markers than its {len(names)} images")
        missing = [n for n in names[: encoded.num_images] if n not in raw.members]
        if missing:
            raise _BadSample(f"image member {missing[0]} is missing")
        return encoded, [(n, raw.members[n]) for n in names[: encoded.num_images]]

    def _decode(self, samples: list[_Prepared], counts: _Counts, replace: bool = True) -> set[int]:
        """Preprocesses the samples' images in one batch; samples with a bad image are
        replaced by their next usable draw, whose images are decoded in turn, or, without
        `replace`, returned (by `id`)."""
        pending, failed = list(range(len(samples))), set()
        while pending:
            images = [image for i in pending for image in samples[i].images]
            pixels, errors = self.decoder(images)
            retry, offset = [], 0
            for i in pending:
                sample, n = samples[i], len(samples[i].images)
                bad = [errors[j] for j in range(offset, offset + n) if j in errors]
                if bad:
                    self._skip(sample.source, sample.index, None, f"image: {bad[0]}", counts, sample.where)
                    if replace:
                        samples[i] = self._prepare(sample.source, sample.k, sample.attempt + 1, counts)
                        retry.append(i)
                    else:
                        failed.add(id(sample))
                else:
                    sample.pixels = pixels[offset : offset + n]
                offset += n
            pending = retry
        return failed

    def _skip(
        self, source: int, index: int, raw: RawSample | None, reason: str, counts: _Counts, where: str | None = None
    ) -> None:
        counts.skipped += 1
        self._skips_by_source[source] += 1
        if (source, index) not in self._bad:
            where = where or (raw.where if raw else f"sample {index}")
            self._bad[source, index] = f"{where}: {reason}"
            logger.warning(f"data: skipping {where} of {self.sources[source].spec}: {reason}")

    def _check_skip_fraction(self, counts: _Counts) -> None:
        seen, skipped = counts.seen, counts.skipped
        if seen < self.min_seen or skipped <= self.max_skip_fraction * seen:
            return
        worst = self._skips_by_source.most_common(1)[0][0]
        example = next(reason for (s, _), reason in self._bad.items() if s == worst)
        raise DataError(
            f"data: {skipped} of the {seen} samples read on this rank were unusable "
            f"({skipped / seen:.1%} > data.max_skip_fraction={self.max_skip_fraction}), most of them in "
            f"{self.sources[worst].spec} (e.g. {example}): fix or rebuild that source with megamod build-shards, "
            "or raise data.max_skip_fraction"
        )


def build_eval_loaders(config: Config, tokenizer: Tokenizer, dp_rank: int, dp_size: int) -> list[TrainLoader]:
    """One loader per `eval.shards` source, over its own order (`data.seed`), reading only
    when asked (no prefetch: evaluation is occasional)."""
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, prefetch_steps=0))
    return [
        TrainLoader([open_source(spec, f"eval.shards[{i}]")], [1.0], config, tokenizer, dp_rank, dp_size)
        for i, spec in enumerate(config.eval.shards)
    ]


def build_train_loader(config: Config, tokenizer: Tokenizer, dp_rank: int, dp_size: int) -> TrainLoader:
    """The loader of `config.data` for one DP rank. "tiny" is read from
    `TINY_CACHE_DIR/shards`, made by `prepare_tiny_shards()` beforehand."""
    data = config.data
    if data.mixture:
        specs = [(s.shards, f"data.mixture[{i}].shards", s.weight) for i, s in enumerate(data.mixture)]
    else:
        specs = [(data.train_shards, "data.train_shards", 1.0)]
    sources = [open_source(spec, key) for spec, key, _ in specs]
    return TrainLoader(sources, [w for _, _, w in specs], config, tokenizer, dp_rank, dp_size)
