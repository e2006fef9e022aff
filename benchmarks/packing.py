"""Useful tokens per second on real-data sample lengths (issue 17's benchmark): the same
samples run padded to `seq_length` (megamod before packing), dynamically padded, packed,
and on the Hugging Face peer as the official LLaVA code runs them. Called by
`benchmarks/run.py --data-mix {llava665k,stage1}` (which builds the models).

Length model (real-run scale: LLaVA-1.5 at seq_length 2048, 576 image tokens at 336 px /
patch 14; each text length is a lognormal with the median and sigma below, clipped):

- `llava665k`, LLaVA-mix-665k (`llava_v1_5_mix665k.json`; LLaVA-1.5 paper, Table 7: LLaVA
  158K, ShareGPT 40K, VQAv2 83K, GQA 72K, OKVQA 9K, OCRVQA 80K, A-OKVQA 66K, TextCaps 22K,
  RefCOCO 48K, VG 86K). Text-only samples: ShareGPT's 40K of 665K = 6.0 % (from the paper).
  Images per sample: 1 for the others (the data card: one image per sample). Text tokens of
  an image sample: median 130, sigma 0.8 (mean ~180, 90th percentile ~360), at least 8;
  an ESTIMATE, no copy of the data set here: LLaVA-1.5 merges all questions of one image
  into one multi-turn conversation (the VQA sources, ~60 % of the image samples: a few
  short-answer turns of ~25 tokens), LLaVA-Instruct's GPT-4 answers run to a few hundred
  tokens, RefCOCO / VG region turns in between; plus the template's system prompt (~35).
  Text-only samples: median 700, sigma 0.9 (mean ~1050), at least 16, truncated at
  seq_length like the real encoder (~12 % are): an ESTIMATE of ShareGPT's multi-turn
  chats. Loss-free prompt share of the text: 40 % (system prompt and human turns; an
  ESTIMATE; it moves the loss, not the work).
- `stage1`, LLaVA-558K captions (`blip_laion_cc_sbu_558k.json`, the plain template): one
  image and a short BLIP caption, text tokens median 18, sigma 0.4 (~10-35 tokens,
  5th-95th percentile; ESTIMATE from the ~10-40 token captions), 1 prompt token (the
  newline after the image), no text-only samples.

At a smaller shape the model scales with it: text lengths by seq_length / 2048 (the
`--quick` data-mix shape is seq_length 512 and 168 px / patch 14 = 144 image tokens, both
1/4 of the real run, so the padding shares are those of the real run), the image tokens
are the model's. A sample is BOS, its image's placeholder tokens, random text ids (any id
of the vocabulary but the tokenizer's special ones), loss on the text after its prompt part, a random image
([3, S, S] normal); truncated to seq_length (never inside the image run: it comes first).

The samples: the official run's micro-batches, `samples // per_device_batch` of them, picked
from LLaVA's sampler order over a pool of 64 of its megabatches (length shapes only; see
`official_micro_batches`), so that the HF peer runs them as the official code would; every
mode runs exactly these samples.

Modes, each over ALL the samples (an epoch):
- `padded`: one sample a row, rows of seq_length, in draw order (megamod before packing),
  micro-batches of `train.micro_batch_size` rows, one a step (as below).
- `dynamic`: one sample a row, samples grouped by modality and sorted by length over all the
  samples (megamod's `data.group_by_length` with the epoch as its window: the best case for
  dynamic padding), each micro-batch padded to its longest sample rounded up to a multiple
  of 8.
- `packed`: `megamod.data.loader.pack_first_fit` over all samples (rows of seq_length, as
  many as it needs; an epoch-sized window: the loader's rule at a global batch of that many
  rows) and `collate_packed` (segment_ids, position_ids).
- `official`: the HF peer's micro-batches as LLaVA-1.5's scripts batch the mix (`PEER_RECIPES`):
  `per_device_batch` samples each, in the order of `LLaVATrainer._get_train_sampler`
  (llava/train/llava_trainer.py, llava-torch 1.2.2.post1, lines 135-148) and padded to
  their longest sample (`DataCollatorForSupervisedDataset`, llava/train/train.py). LLaVA's
  `group_by_modality_length` does NOT put samples of similar length together: it cuts a
  random megabatch of one modality (ranks x accumulation x per-device samples) into
  per-rank chunks of equal total length, each chunk taking one of the megabatch's longest
  samples (`split_to_even_chunks`), so each micro-batch pads to near the megabatch's top.
The megamod models step through `train_step`; the HF peer steps `official` (the comparison
the issue asks for) and `dynamic` (the same micro-batches as megamod's: the two
implementations' speed alone). Collation is the loader's own (`collate`, `collate_packed`);
reading and decoding are not modelled (the samples are made in memory).

Timing: each run (model x mode) takes `warmup` untimed steps on its first micro-batch, then
the runs' steps are interleaved so that their progress through the epoch stays even (the
run least far through its epoch steps next): load from other processes on a shared machine
falls on every run alike. A run's epoch time is the sum of its step times; with several
epochs, the median. Useful tokens are the non-padding tokens: the same samples, so the same
count, in every mode.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from megamod.data.conversation import IGNORE_INDEX, EncodedSample
from megamod.data.loader import collate, collate_packed, pack_first_fit

REAL_SEQ_LENGTH = 2048  # LLaVA-1.5's; text lengths below are at this scale
DYNAMIC_PAD_MULTIPLE = 8  # data.pad_to_multiple's default
MEGAMOD_MODES = ("padded", "dynamic", "packed")
PEER_MODES = ("dynamic", "official")
PEER_POOL_MEGABATCHES = 64  # the sampler's pool: the timed micro-batches are a stratified pick
# The data-mix shapes on top of run.py's SHAPES: --quick at 1/4 of the real run.
SHAPE_OVERRIDES = {
    "quick": ["model.vision.image_size=168", "model.language.seq_length=512"],
    "default": ["model.language.seq_length=2048"],
    "smoke": [],
}


@dataclass(frozen=True)
class TextLength:
    """Text tokens of a sample at the real-run scale: lognormal, clipped below."""

    median: float
    sigma: float
    minimum: int

    def draw(self, rng: np.random.Generator) -> float:
        return max(self.minimum, self.median * math.exp(self.sigma * rng.standard_normal()))


@dataclass(frozen=True)
class Mix:
    text_only_share: float
    image_text: TextLength  # text tokens of an image sample
    text_only: TextLength | None
    prompt_share: float  # share of the text without loss (at least 1 token)


MIXES = {
    "llava665k": Mix(text_only_share=40 / 665, image_text=TextLength(130, 0.8, 8),
                     text_only=TextLength(700, 0.9, 16), prompt_share=0.4),
    "stage1": Mix(text_only_share=0.0, image_text=TextLength(18, 0.4, 4), text_only=None,
                  prompt_share=0.0),
}


@dataclass(frozen=True)
class PeerRecipe:
    """How LLaVA-1.5's own scripts batch a mix: `--per_device_train_batch_size`, GPUs x
    `--gradient_accumulation_steps` (the `world_size` LLaVATrainer gives its sampler) and
    `--group_by_modality_length`."""

    per_device_batch: int
    ranks: int
    group_by_modality_length: bool


PEER_RECIPES = {
    # scripts/v1_5/finetune.sh: 16 per device, accumulation 1, group_by_modality_length
    # True, on 8 GPUs (global batch 128).
    "llava665k": PeerRecipe(per_device_batch=16, ranks=8, group_by_modality_length=True),
    # scripts/v1_5/pretrain.sh: 32 per device, accumulation 1, no grouping (the HF
    # Trainer's random sampler), on 8 GPUs (global batch 256).
    "stage1": PeerRecipe(per_device_batch=32, ranks=8, group_by_modality_length=False),
}


@dataclass(frozen=True)
class SampleShape:
    """A drawn sample before it is made: whether it has an image, and its text tokens at
    this shape's scale."""

    text_only: bool
    text: int

    def length(self, image_tokens: int, bos: bool, seq_length: int) -> int:
        return min(seq_length, int(bos) + (0 if self.text_only else image_tokens) + self.text)


def draw_shapes(mix: Mix, count: int, seq_length: int, rng: np.random.Generator) -> list[SampleShape]:
    """`count` sample shapes of `mix` at seq_length's scale (see the module docstring)."""
    scale = seq_length / REAL_SEQ_LENGTH
    shapes = []
    for _ in range(count):
        text_only = rng.random() < mix.text_only_share
        text = max(2, round((mix.text_only if text_only else mix.image_text).draw(rng) * scale))
        shapes.append(SampleShape(text_only, text))
    return shapes


# LLaVA's sampler (llava/train/llava_trainer.py, llava-torch 1.2.2.post1), transliterated
# because that module imports the transformers 4.36 Trainer; tests/test_benchmark.py runs the
# official functions on the same input and compares.
def _split_to_even_chunks(indices: list[int], lengths: list[int], num_chunks: int) -> list[list[int]]:
    """`split_to_even_chunks` (lines 38-57): each index, longest first, to the chunk with
    the least total length that still has room."""
    if len(indices) % num_chunks != 0:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals: list[float] = [0] * num_chunks
    for index in indices:
        shortest = totals.index(min(totals))
        chunks[shortest].append(index)
        totals[shortest] += lengths[index]
        if len(chunks[shortest]) == per_chunk:
            totals[shortest] = float("inf")
    return chunks


def _length_grouped_indices(lengths: list[int], batch_size: int, world_size: int,
                            generator: torch.Generator | None) -> list[int]:
    """`get_length_grouped_indices` (lines 88-96)."""
    indices = torch.randperm(len(lengths), generator=generator)
    size = world_size * batch_size
    megabatches = [indices[i : i + size].tolist() for i in range(0, len(lengths), size)]
    megabatches = [sorted(m, key=lambda i: lengths[i], reverse=True) for m in megabatches]
    return [i for m in megabatches for chunk in _split_to_even_chunks(m, lengths, world_size) for i in chunk]


def modality_length_grouped_indices(lengths: list[int], batch_size: int, world_size: int,
                                    generator: torch.Generator | None = None) -> list[int]:
    """`get_modality_length_grouped_indices` (lines 60-85): `lengths` positive for samples
    with an image, negative for text-only ones. Like the original, the per-modality orders
    draw from torch's global generator, the megabatch shuffle from `generator`."""
    assert all(n != 0 for n in lengths), "Should not have zero length."
    if all(n > 0 for n in lengths) or all(n < 0 for n in lengths):
        return _length_grouped_indices(lengths, batch_size, world_size, generator)
    mm_indices, mm_lengths = zip(*[(i, n) for i, n in enumerate(lengths) if n > 0])
    lang_indices, lang_lengths = zip(*[(i, -n) for i, n in enumerate(lengths) if n < 0])
    mm_shuffle = [mm_indices[i] for i in _length_grouped_indices(mm_lengths, batch_size, world_size, None)]
    lang_shuffle = [lang_indices[i] for i in _length_grouped_indices(lang_lengths, batch_size, world_size, None)]
    size = world_size * batch_size
    mm_megabatches = [mm_shuffle[i : i + size] for i in range(0, len(mm_shuffle), size)]
    lang_megabatches = [lang_shuffle[i : i + size] for i in range(0, len(lang_shuffle), size)]
    additional = mm_megabatches[-1] + lang_megabatches[-1]
    megabatches = mm_megabatches[:-1] + lang_megabatches[:-1]
    megabatches = [megabatches[i] for i in torch.randperm(len(megabatches), generator=generator)]
    if additional:
        megabatches.append(sorted(additional))
    return [i for m in megabatches for i in m]


def official_micro_batches(
    shapes: list[SampleShape], lengths: list[int], recipe: PeerRecipe, count: int, seed: int
) -> list[list[int]]:
    """`count` micro-batches (indices into `shapes`) of the official run over the pool
    `shapes`: its sampler's order (group_by_modality_length: `LLaVATrainer._get_train_sampler`;
    otherwise a random permutation, as the HF Trainer's `RandomSampler`), cut into
    per-device batches as the ranks and accumulation steps take them in turn. Picked
    stratified by modality (text-only micro-batches in the pool's share of text-only
    samples, the rest image ones, each the first in the order), leaving out the order's
    last megabatch (the original's remainders of both modalities, sorted by index: one
    megabatch in thousands at the data set's size, not in 64)."""
    torch.manual_seed(seed)  # the per-modality orders draw from torch's global generator
    generator = torch.Generator().manual_seed(seed)
    b, size = recipe.per_device_batch, recipe.per_device_batch * recipe.ranks
    text_only = sum(shape.text_only for shape in shapes)
    if recipe.group_by_modality_length:
        signed = [-n if shape.text_only else n for shape, n in zip(shapes, lengths)]
        order = modality_length_grouped_indices(signed, b, recipe.ranks, generator)
        if 0 < text_only < len(shapes):  # the last megabatch holds both modalities' remainders
            remainders = sum((n - 1) % size + 1 for n in (text_only, len(shapes) - text_only))
        else:  # one modality: the last megabatch may be short
            remainders = len(order) % size
        order = order[: len(order) - remainders]
    else:
        order = torch.randperm(len(shapes), generator=generator).tolist()
    chunks = [order[i : i + b] for i in range(0, len(order) - b + 1, b)]
    text_chunks = round(count * text_only / len(shapes))
    by_modality = {True: [], False: []}
    for chunk in chunks:
        by_modality[all(shapes[i].text_only for i in chunk)].append(chunk)
    picked = by_modality[True][:text_chunks] + by_modality[False][: count - text_chunks]
    if len(picked) < count:
        raise ValueError(f"the pool holds {len(picked)} of the {count} micro-batches asked for")
    return picked


@dataclass
class SyntheticSample:
    """What `collate` and `collate_packed` read of the loader's prepared sample."""

    encoded: EncodedSample
    pixels: np.ndarray  # float32 [images, 3, S, S]


@dataclass(frozen=True)
class TokenIds:
    pad: int
    bos: int | None
    image: int
    text: np.ndarray  # the ids text is drawn from: the vocabulary less its special ids


def make_sample(
    shape: SampleShape, mix: Mix, seq_length: int, image_tokens: int, image_size: int,
    ids: TokenIds, rng: np.random.Generator,
) -> SyntheticSample:
    """The sample of `shape`: random text ids and image (see the module docstring)."""
    text = shape.text
    head = ([] if ids.bos is None else [ids.bos]) + ([] if shape.text_only else [ids.image] * image_tokens)
    # Some answer survives truncation (the loader skips samples left without one).
    prompt = min(max(1, round(text * mix.prompt_share)), seq_length - len(head) - 2)
    full = head + rng.choice(ids.text, text).tolist()
    trained = np.zeros(len(full), dtype=bool)
    trained[len(head) + prompt :] = True
    # As encode_conversation: cut at seq_length, labels shifted (labels[i] = tokens[i + 1]).
    cut = min(len(full), seq_length)
    tokens = np.full(seq_length, ids.pad, dtype=np.int64)
    tokens[:cut] = full[:cut]
    labels = np.full(seq_length, IGNORE_INDEX, dtype=np.int64)
    labels[: cut - 1] = np.where(trained[1:cut], tokens[1:cut], IGNORE_INDEX)
    images = 0 if shape.text_only else 1
    pixels = rng.standard_normal((images, 3, image_size, image_size), dtype=np.float32)
    encoded = EncodedSample(tokens=tokens, labels=labels, num_images=images,
                            truncated=len(full) > cut, length=cut)
    return SyntheticSample(encoded, pixels)


def draw_samples(
    mix_name: str, samples: int, seq_length: int, image_tokens: int, image_size: int,
    ids: TokenIds, seed: int, recipe: PeerRecipe,
) -> tuple[list[SyntheticSample], list[list[int]]]:
    """The benchmark's samples (in draw order) and the official run's micro-batches of
    them (indices into the samples): `samples // recipe.per_device_batch` micro-batches
    picked from a pool of PEER_POOL_MEGABATCHES megabatches of `mix_name`."""
    mix = MIXES[mix_name]
    count = samples // recipe.per_device_batch
    if count == 0:
        raise ValueError(f"--samples {samples}: at least one micro-batch of the official run "
                         f"({recipe.per_device_batch} samples)")
    rng = np.random.default_rng(seed)
    pool = draw_shapes(mix, PEER_POOL_MEGABATCHES * recipe.per_device_batch * recipe.ranks, seq_length, rng)
    lengths = [shape.length(image_tokens, ids.bos is not None, seq_length) for shape in pool]
    picked = official_micro_batches(pool, lengths, recipe, count, seed)
    chosen = sorted(i for batch in picked for i in batch)  # draw order
    samples_of = {i: make_sample(pool[i], mix, seq_length, image_tokens, image_size, ids, rng)
                  for i in chosen}
    position = {i: n for n, i in enumerate(chosen)}
    return [samples_of[i] for i in chosen], [[position[i] for i in batch] for batch in picked]


def mode_batches(
    samples: list[SyntheticSample], official: list[list[int]], micro_batch_size: int,
    seq_length: int, pad_id: int, image_size: int,
) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Each mode's micro-batches over all `samples` (see the module docstring); `official`:
    the official run's micro-batches, as indices into `samples`."""
    mbs = micro_batch_size
    padded = [collate(samples[i : i + mbs], seq_length) for i in range(0, len(samples), mbs)]
    # Text-only and image samples apart, longest first in each.
    order = sorted(samples, key=lambda s: (s.encoded.num_images == 0, -s.encoded.length))
    dynamic = []
    for i in range(0, len(order), mbs):
        group = order[i : i + mbs]
        longest = max(s.encoded.length for s in group)
        width = min(seq_length, math.ceil(longest / DYNAMIC_PAD_MULTIPLE) * DYNAMIC_PAD_MULTIPLE)
        dynamic.append(collate(group, width))
    placed = pack_first_fit([s.encoded.length for s in samples], len(samples), seq_length)
    rows = [[samples[i] for i in row] for row in placed if row]
    packed = [collate_packed(rows[i : i + mbs], seq_length, pad_id, image_size)
              for i in range(0, len(rows), mbs)]
    # The official collator pads to the longest sample exactly.
    official_batches = [collate(group, max(s.encoded.length for s in group))
                        for group in ([samples[i] for i in batch] for batch in official)]
    return {"padded": padded, "dynamic": dynamic, "packed": packed, "official": official_batches}


def mode_figures(batches: list[dict[str, torch.Tensor]]) -> dict[str, float | int]:
    """Rows, row positions, useful (non-padding) tokens and the padding fraction."""
    positions = sum(b["padding_mask"].numel() for b in batches)
    useful = sum(int((~b["padding_mask"]).sum()) for b in batches)
    return {"steps": len(batches), "rows": sum(b["tokens"].shape[0] for b in batches),
            "positions": positions, "useful_tokens": useful,
            "padding_fraction": 1.0 - useful / positions}


Step = Callable[[list[dict[str, torch.Tensor]]], object]


def time_epochs(
    runs: dict[str, tuple[Step, list[dict[str, torch.Tensor]]]], warmup: int, epochs: int
) -> dict[str, list[float]]:
    """Epoch seconds of each run (a step function and its micro-batches, one a step),
    interleaved as the module docstring says."""
    for step, batches in runs.values():
        for _ in range(warmup):
            step(batches[:1])
    epoch_times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(epochs):
        done = dict.fromkeys(runs, 0)
        seconds = dict.fromkeys(runs, 0.0)
        while True:
            pending = [n for n in runs if done[n] < len(runs[n][1])]
            if not pending:
                break
            name = min(pending, key=lambda n: done[n] / len(runs[n][1]))
            step, batches = runs[name]
            start = time.perf_counter()
            step([batches[done[name]]])
            seconds[name] += time.perf_counter() - start
            done[name] += 1
        for name in runs:
            epoch_times[name].append(seconds[name])
    return epoch_times


def results(
    epoch_times: dict[str, list[float]], figures: dict[str, dict[str, float | int]],
    tflops: dict[str, float],
) -> dict[str, dict[str, float]]:
    """Per run `model/mode`: epoch time (median), per step, useful tokens per second, and
    its model TFLOPs per epoch (`tflops`)."""
    out = {}
    for name, times in epoch_times.items():
        mode = name.split("/")[1]
        epoch = statistics.median(times)
        out[name] = {"epoch_s": epoch, "epoch_min_s": min(times),
                     "step_time_s": epoch / figures[mode]["steps"],
                     "useful_tokens_per_s": figures[mode]["useful_tokens"] / epoch,
                     "tflops_per_epoch": tflops[name]}
    return out


def ratios(runs: dict[str, dict[str, float]]) -> dict[str, float]:
    """Useful-token throughput ratios on the dense model (> 1: the first is faster), and per
    mode MoD's epoch-time ratio to dense (the same rows: its step-time saving) and its model
    FLOPs ratio (StepFlops counts padding as computed, which MoD layers skip: under
    padding MoD's FLOPs are overstated)."""
    rate = {name: r["useful_tokens_per_s"] for name, r in runs.items()}
    out = {}
    if "dense/padded" in rate:
        out["ratio_packed_vs_padded_useful_tokens"] = rate["dense/packed"] / rate["dense/padded"]
        out["ratio_dynamic_vs_padded_useful_tokens"] = rate["dense/dynamic"] / rate["dense/padded"]
    if "hf/official" in rate:
        out["ratio_packed_vs_hf_useful_tokens"] = rate["dense/packed"] / rate["hf/official"]
        out["ratio_dynamic_vs_hf_useful_tokens"] = rate["dense/dynamic"] / rate["hf/official"]
        # The two implementations on the same micro-batches: speed alone.
        out["ratio_dense_vs_hf_same_micro_batches"] = rate["dense/dynamic"] / rate["hf/dynamic"]
    if "mod/packed" in rate:
        for mode in MEGAMOD_MODES:
            mod, dense = runs[f"mod/{mode}"], runs[f"dense/{mode}"]
            out[f"ratio_mod_vs_dense_{mode}"] = mod["epoch_s"] / dense["epoch_s"]
            out[f"flops_ratio_mod_vs_dense_{mode}"] = mod["tflops_per_epoch"] / dense["tflops_per_epoch"]
        out["ratio_mod_packed_vs_dense_padded_useful_tokens"] = rate["mod/packed"] / rate["dense/padded"]
    return out


def print_table(summary: dict) -> None:
    print(f"data mix {summary['data_mix']} ({summary['samples']} samples, {summary['text_only_samples']} "
          f"text-only, {summary['truncated_samples']} truncated; mean length {summary['mean_length']:.1f} "
          f"of seq_length {summary['seq_length']}); {summary['device']}, {summary['threads']} threads; "
          f"median of {summary['epochs']} epoch(s) after {summary['warmup']} warm-up step(s) per run")
    print(f"{'mode':8s} {'steps':>5s} {'rows':>5s} {'positions':>9s} {'useful':>7s} {'padding':>7s}")
    for mode, m in summary["modes"].items():
        print(f"{mode:8s} {m['steps']:5d} {m['rows']:5d} {m['positions']:9d} {m['useful_tokens']:7d} "
              f"{m['padding_fraction']:7.1%}")
    print(f"{'run':14s} {'epoch s':>8s} {'min s':>8s} {'step s':>7s} {'useful tok/s':>12s} "
          f"{'TFLOP/epoch':>11s}")
    for name, r in summary["runs"].items():
        print(f"{name:14s} {r['epoch_s']:8.2f} {r['epoch_min_s']:8.2f} {r['step_time_s']:7.3f} "
              f"{r['useful_tokens_per_s']:12.1f} {r['tflops_per_epoch']:11.4f}")
    for name, value in summary["ratios"].items():
        print(f"{name:46s} {value:.3f}")
