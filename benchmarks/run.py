"""Training-step benchmark (issue "Performance"): megamod's dense, MoE, MoD and MoD+MoE
variants of one shape, and Hugging Face's `LlavaForConditionalGeneration` as the dense
shape's peer, on the same micro-batches, built in one process and timed interleaved.

    python benchmarks/run.py --quick [--steps 5] [--warmup 1] [--variants dense,mod,hf] [--json]
    python benchmarks/run.py --quick --set model.language.seq_length=1280   # a shape's variation
    python benchmarks/run.py --dry-run      # the default ~1B GPU shape on paper: shapes, FLOPs
    python benchmarks/run.py --quick --data-mix llava665k [--samples 256] [--json]   # or stage1

`--data-mix` is issue 17's benchmark instead of the step one: useful (non-padding) tokens/s
of the dense and MoD models on sample lengths modelled on a LLaVA data mix, padded to
seq_length, dynamically padded and packed, and of the HF peer as the official code runs
(`benchmarks/packing.py` says what it models; `data_mix_benchmark` builds the models).

Each megamod variant is a config (examples/configs/tiny.yaml + the shape's overrides + the
variant's), built by `megamod.training.loop.setup` in a world of one (megatron-core's
parallel state re-initialised per variant, same seed) and stepped by `train_step` on one
step's micro-batches drawn beforehand from the dense build's loader (data loading is not
timed; all variants step on the same samples). The HF peer is the dense model converted by
`megamod convert`'s adapter (`megamod.convert.hf.to_hf`: the ViT's built layers, the last
one the feature layer; the dense model's initial weights), the same parts frozen,
torch.optim.AdamW and the same gradient clipping; eager attention on CPU, SDPA on GPU.
Before any step both compute the loss of the micro-batches (`same_weights_loss` in the
JSON): equal, they do the same work. After the warm-up, each repetition steps every variant
once, in turn; a variant's step time is its median. FLOPs are `megamod.training.flops`'
model FLOPs (the HF peer does the dense model's work). Memory: on GPU each variant's step
peak above what was allocated before its step (all variants stay resident); on CPU the
process' peak RSS, once.

Generation (`--generation-tokens`, 0 to skip; with `dense` and `mod`): `inference.py`
times prefill and per-token decode of the dense and MoD models (after their training steps)
on the benchmark's samples at batch 1 and 8, with their KV-cache bytes as allocated:
`ratio_mod_vs_dense_prefill` and `ratio_mod_vs_dense_decode` (batch 8; per batch size
with a `_b<batch>` suffix) and `kv_cache_ratio_measured_b<batch>`.

The loader figure (`--loader-steps`, 0 to skip): the bundled tiny data set built into
shards by the project's shard builder (`prepare_tiny_shards`, in a temporary folder), read
by the training loader of the dense config (its image decoder: DALI when installed, else
Pillow; one thread per CPU core, no prefetch), timed alone after the steps: images per second
it delivers against the images per second the dense step consumes (`ratio_loader_vs_step`;
>= 3 means the loader keeps up with room to spare, on cores of its own).

Default shape (not --quick): CLIP ViT-L/336 (frozen, as in LLaVA SFT) + a 16-layer,
2048-wide decoder (0.85B parameters; 1.7B with MoE), bf16, 4 x 1024 tokens per micro-batch.
All five variants resident hold ~100 GB of weights, gradients and optimizer state (on paper,
not run yet): an H200, or on an 80 GB H100 e.g. `--variants dense,mod,hf`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from megamod.config import Config, load_config
from megamod.training.flops import Sample, StepFlops, kv_cache_bytes, sample_flops

import packing  # benchmarks/packing.py
from inference import generation_ratios, measure_generation  # benchmarks/inference.py

BASE = Path(__file__).resolve().parents[1] / "examples" / "configs" / "tiny.yaml"


def keys(section: str, **values: object) -> list[str]:
    """Command-line overrides `section.key=value`."""
    return [f"{section}.{key}={value}" for key, value in values.items()]


COMMON = (keys("checkpoint", save_dir="null", save_interval="null")
          + keys("logging", tensorboard_dir="null")
          + keys("data", num_workers=1, prefetch_steps=0, max_skip_fraction=0.9))
SHAPES = {
    # CPU-sized, with what MoD exploits: 576 vision tokens of a 640-token sequence, and 8
    # decoder layers, so PRD makes 6 of them MoD layers: LLaVA-1.5-7B's share (24 of 32).
    "quick": keys("model.vision", image_size=336, patch_size=14, num_layers=3, hidden_size=96,
                  ffn_hidden_size=384, num_attention_heads=4)
    + keys("model.language", num_layers=8, hidden_size=512, ffn_hidden_size=1408,
           num_attention_heads=8, num_query_groups=4, seq_length=640)
    + keys("train", micro_batch_size=2, global_batch_size=2),
    # For one GPU: CLIP ViT-L/336 (frozen) + a TinyLlama-width decoder of 16 layers.
    "default": keys("model.vision", image_size=336, patch_size=14, num_layers=24, hidden_size=1024,
                    ffn_hidden_size=4096, num_attention_heads=16)
    + keys("model.language", num_layers=16, hidden_size=2048, ffn_hidden_size=5632,
           num_attention_heads=16, num_query_groups=4, seq_length=1024, vocab_size=32000)
    + keys("train", micro_batch_size=4, global_batch_size=8, trainable="[projector,language]")
    + keys("precision", params_dtype="bf16"),
    # For the test: the tiny model, 2 layers, one sample a step.
    "smoke": keys("model.language", num_layers=2)
    + keys("train", micro_batch_size=1, global_batch_size=1),
}
MOE = keys("moe", num_experts=4, router_topk=2, layer_freq=2)
MOD = keys("mod", enabled="true", schedule="prd")
VARIANTS = {"dense": [], "moe": MOE, "mod": MOD, "mod_moe": MOD + MOE, "hf": []}
DATA_MIX_VARIANTS = ("dense", "mod", "hf")
# Dense bf16 tensor-core peaks (no sparsity), by a substring of the device name.
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}


@dataclass
class Variant:
    name: str
    overrides: list[str]
    config: Config
    step: Callable[[], object] = lambda: None  # set by build_megamod / build_hf
    model: Any = None  # megamod's LLaVA (build_megamod), for the generation figures
    tflops_per_step: float = 0.0
    times: list[float] = field(default_factory=list)
    step_memory: list[float] = field(default_factory=list)  # GiB above the resident, GPU only


def init_world(config: Config) -> None:
    """(Re)build megatron-core's parallel state for `config` in this one-rank job (seeded)."""
    from megatron.core import parallel_state

    from megamod.parallel import free_port, init_distributed

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if not torch.distributed.is_initialized():  # its own free port, never an inherited one
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    init_distributed(config.parallel, config.train.seed)


def loader_rate(overrides: list[str], steps: int) -> dict[str, float | int | str]:
    """Images per second delivered by the training loader of the config that `overrides`
    make, on shards built from the bundled tiny data set: `steps` loader steps after one
    warm-up step (the decoder's start-up)."""
    from megamod.data.loader import build_train_loader, prepare_tiny_shards
    from megamod.data.tokenizer import load_tokenizer

    workers = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        shards = prepare_tiny_shards(Path(tmp))
        config = load_config(BASE, [*overrides, f"data.train_shards={shards}",
                                    f"data.num_workers={workers}", "data.prefetch_steps=0"])
        with build_train_loader(config, load_tokenizer(config.data.tokenizer), 0, 1) as loader:
            loader.next_step()
            images, start = 0, time.perf_counter()
            for _ in range(steps):
                images += sum(len(batch["images"]) for batch in loader.next_step())
            seconds = time.perf_counter() - start
            decoder = type(loader.decoder).__name__
    return {"decoder": decoder, "workers": workers, "images": images, "images_per_s": images / seconds}


def train_state(config: Config) -> Any:
    """megamod's `TrainState` for `config`, built in this world of one (its loader open)."""
    from megamod.training.loop import setup

    init_world(config)
    return setup(config)


def build_megamod(
    variant: Variant, micro_batches: list[dict] | None = None
) -> tuple[list[dict], int, int]:
    """Sets `variant.step` to a step on `micro_batches` (default: its loader's first step);
    returns them, the vocab size and the image token id."""
    from megatron.core.utils import unwrap_model

    from megamod.training.loop import train_step

    state = train_state(variant.config)
    micro_batches = micro_batches or state.loader.next_step()
    state.loader.close()
    llava = unwrap_model(state.model)
    vocab_size, image_id = llava.language_model.vocab_size, llava.image_token_id
    variant.tflops_per_step = StepFlops(variant.config, vocab_size, image_id)(micro_batches) / 1e12
    variant.step = lambda: train_step(state, micro_batches)
    variant.model = llava
    return micro_batches, vocab_size, image_id


def generators(variants: list[Variant]) -> dict[str, Any]:
    """The dense and MoD models as `Generator`s, for the generation figures."""
    from megamod.data.tokenizer import load_tokenizer
    from megamod.inference.generate import Generator

    chosen = [v for v in variants if v.name in ("dense", "mod")]
    tokenizer = load_tokenizer(chosen[0].config.data.tokenizer)
    return {v.name: Generator(v.model, tokenizer, v.config) for v in chosen}


def build_hf(
    variant: Variant, micro_batches: list[dict], image_id: int, dense: Any,
    attention: str | None = None, attention_mask: bool = False,
) -> Callable[[list[dict]], None]:
    """The dense model as `LlavaForConditionalGeneration`, its weights copied by the HF
    adapter of `megamod convert` (`to_hf`), the same parts frozen, AdamW with the config's
    hyperparameters and clipping; sets `variant.step` (a step on `micro_batches`) and
    `variant.model`, and returns the step on any micro-batches. `attention`: HF's
    attn_implementation (default eager on CPU, SDPA on GPU); `attention_mask`: pass each
    micro-batch's padding to HF as its attention_mask (rows padded on the right)."""
    from safetensors.torch import save_file
    from transformers import LlavaForConditionalGeneration

    from megamod.convert.hf import to_hf
    from megamod.precision import DTYPES

    config = variant.config
    dtype = DTYPES[config.precision.params_dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    state, hf_config = to_hf(dense.state_dict(), config, image_id)
    with tempfile.TemporaryDirectory() as folder:  # as `megamod convert --to hf` writes it
        save_file({k: v.contiguous() for k, v in state.items()}, f"{folder}/model.safetensors",
                  metadata={"format": "pt"})
        Path(folder, "config.json").write_text(json.dumps(hf_config))
        model = LlavaForConditionalGeneration.from_pretrained(
            folder, attn_implementation=attention or ("sdpa" if device == "cuda" else "eager"),
            dtype=dtype
        ).to(device).train()
    variant.model = model
    parts = {"vision": [model.model.vision_tower], "projector": [model.model.multi_modal_projector],
             "language": [model.model.language_model, model.lm_head]}
    model.requires_grad_(False)
    for name in config.train.trainable:
        for module in parts[name]:
            module.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    train = config.train
    optimizer = torch.optim.AdamW(params, lr=train.lr, betas=(train.adam_beta1, train.adam_beta2),
                                  eps=train.adam_eps, weight_decay=train.weight_decay)

    def step_on(batches: list[dict]) -> None:
        optimizer.zero_grad(set_to_none=True)
        for loss in hf_losses(model, batches, attention_mask):
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train.clip_grad)
        optimizer.step()

    variant.step = lambda: step_on(micro_batches)
    return step_on


def hf_losses(
    model: Any, micro_batches: list[dict], attention_mask: bool = False
) -> Iterator[torch.Tensor]:
    """Each micro-batch's share of the step's loss from the HF model (summed over its loss
    tokens, divided by the step's: megamod's normalisation), one at a time so a training
    step can run backward on each before the next forward. `attention_mask`: the rows'
    padding goes to HF as its attention_mask."""
    device, dtype = model.device, model.dtype
    loss_tokens = sum(b["loss_mask"].sum() for b in micro_batches).to(device)
    for batch in micro_batches:
        images = batch["images"].to(device, dtype) if len(batch["images"]) else None
        attend = (~batch["padding_mask"]).long().to(device) if attention_mask else None
        logits = model(input_ids=batch["tokens"].to(device), pixel_values=images,
                       attention_mask=attend).logits
        # megamod's labels are already the next tokens (Megatron-LM's layout): no shift.
        labels, mask = batch["labels"].to(device), batch["loss_mask"].to(device)
        losses = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
        yield (losses * mask.flatten()).sum() / loss_tokens


def megamod_losses(model: Any, micro_batches: list[dict]) -> Iterator[torch.Tensor]:
    """The same from megamod's LLaVA (its forward returns per-token losses)."""
    device = next(model.parameters()).device
    loss_tokens = sum(b["loss_mask"].sum() for b in micro_batches).to(device)
    for batch in micro_batches:
        mask = batch["loss_mask"].to(device)
        losses = model(batch["tokens"].to(device), batch["images"].to(device),
                       batch["labels"].to(device), mask)
        yield (losses.float() * mask).sum() / loss_tokens


def same_weights_losses(variants: list[Variant], micro_batches: list[dict]) -> dict[str, float]:
    """Before any step, megamod's dense model and the HF peer (its weights copied) on the
    same micro-batches: the loss of each, in eval mode (no dropout), for the harness test."""
    dense, hf = (next(v for v in variants if v.name == name) for name in ("dense", "hf"))
    with torch.no_grad():
        dense.model.eval(), hf.model.eval()
        losses = {"megamod": float(sum(megamod_losses(dense.model, micro_batches))),
                  "hf": float(sum(hf_losses(hf.model, micro_batches)))}
        dense.model.train(), hf.model.train()
    return losses


def timed(variant: Variant) -> None:
    """One step of `variant`, its time (and on GPU its memory) recorded."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    variant.step()
    if cuda:
        torch.cuda.synchronize()
        variant.step_memory.append((torch.cuda.max_memory_allocated() - resident) / 2**30)
    variant.times.append(time.perf_counter() - start)


def device_peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def ratios(results: dict[str, dict], configs: dict[str, Config]) -> dict[str, float]:
    """Step-time ratios (< 1: the first is faster), MoE's per model FLOP, and MoD's FLOPs
    and KV-cache ratios."""
    time_of = {name: r["step_time_s"] for name, r in results.items()}
    out = {f"ratio_{name}_vs_dense": time_of[name] / time_of["dense"]
           for name in ("mod", "moe", "mod_moe") if name in time_of}
    if "moe" in time_of:  # MoE does more FLOPs by design: its cost per FLOP is the overhead
        per_flop = {name: time_of[name] / results[name]["tflops_per_step"] for name in ("moe", "dense")}
        out["ratio_moe_vs_dense_per_flop"] = per_flop["moe"] / per_flop["dense"]
    if "hf" in time_of:
        out["ratio_megamod_vs_hf"] = time_of["dense"] / time_of["hf"]
    if "mod" in time_of:
        dense, mod = results["dense"]["tflops_per_step"], results["mod"]["tflops_per_step"]
        out["flops_ratio"] = mod / dense
        typical = Sample(images=1, seq_length=configs["dense"].model.language.seq_length)
        kv = {name: kv_cache_bytes(configs[name], typical) for name in ("dense", "mod")}
        out["kv_cache_ratio"] = kv["mod"] / kv["dense"]
    return out


def dry_run(variants: list[Variant]) -> None:
    """Shapes and, for a 1-image sample, model TFLOPs and KV cache per variant, unbuilt."""
    from megamod.data.tokenizer import load_tokenizer
    from megamod.models.build import vocab_size

    config = variants[0].config
    vision, language = config.model.vision, config.model.language
    vocab = vocab_size(config, load_tokenizer(config.data.tokenizer).vocab_size)
    print(f"ViT {vision.num_built_layers}/{vision.num_layers} layers x {vision.hidden_size} at "
          f"{vision.image_size} px ({vision.num_patches} tokens); decoder {language.num_layers} "
          f"layers x {language.hidden_size} (ffn {language.ffn_hidden_size}, "
          f"{language.num_attention_heads} heads, {language.num_query_groups} groups), "
          f"seq {language.seq_length}, vocab {vocab}")
    sample = Sample(images=1, seq_length=language.seq_length)
    for v in variants:
        flops = sample_flops(v.config, sample, vocab) / 1e12
        kv = kv_cache_bytes(v.config, sample) / 2**20
        print(f"{v.name:8s} {flops:8.3f} TFLOPs/sample (training)  KV cache {kv:7.1f} MiB (bf16)")


def build(variants: list[Variant]) -> tuple[list[dict], int, int]:
    """Every variant built; the data (and the HF peer's vocabulary) come from the dense
    build, and all variants step on them. Returns what `build_megamod` does."""
    dense = next(v for v in variants if v.name == "dense")
    micro_batches, vocab_size, image_id = build_megamod(dense)
    for variant in variants:
        if variant.name == "hf":
            build_hf(variant, micro_batches, image_id, dense.model)
            variant.tflops_per_step = dense.tflops_per_step
        elif variant is not dense:
            build_megamod(variant, micro_batches)
    return micro_batches, vocab_size, image_id


def measure(variants: list[Variant], warmup: int, steps: int) -> None:
    """Warm-up steps per variant, then `steps` repetitions, each stepping every variant."""
    for variant in variants:
        for _ in range(warmup):
            variant.step()
    for _ in range(steps):
        for variant in variants:
            timed(variant)


def results_of(variant: Variant, tokens_per_step: int, peak: float | None) -> dict[str, float]:
    step_time = statistics.median(variant.times)
    tflops = variant.tflops_per_step
    # The minimum too: on a shared machine it is the least disturbed repetition.
    result = {"step_time_s": step_time, "step_time_min_s": min(variant.times),
              "tokens_per_s": tokens_per_step / step_time,
              "tflops_per_step": tflops, "tflops_per_s": tflops / step_time}
    if peak is not None:
        result["mfu"] = result["tflops_per_s"] / peak
    if variant.step_memory:
        result["step_memory_gib"] = max(variant.step_memory)
    return result


def data_mix_benchmark(
    mix: str, names: list[str], shape_name: str, extra: list[str], samples: int, epochs: int,
    warmup: int, peer_batch: int | None = None,
) -> dict:
    """Issue 17's benchmark (`benchmarks/packing.py`, whose docstring says what it models):
    the dense and MoD models, built with data.packing=true so that one model serves every
    mode, step through the same samples padded to seq_length, dynamically padded and packed;
    the HF peer (SDPA, an attention_mask) through the official run's micro-batches of them
    and through megamod's dynamic ones. `peer_batch` replaces the peer recipe's per-device
    batch (the smoke test's). Returns the summary."""
    import numpy as np
    from megatron.core.utils import unwrap_model

    from megamod.data.tokenizer import load_tokenizer
    from megamod.training.loop import train_step

    overrides = {name: COMMON + SHAPES[shape_name] + packing.SHAPE_OVERRIDES[shape_name]
                 + ["data.packing=true"] + extra + VARIANTS[name]
                 for name in names if name != "hf"}
    configs = {name: load_config(BASE, o) for name, o in overrides.items()}
    states = {name: train_state(config) for name, config in configs.items()}
    for state in states.values():
        state.loader.close()  # the samples are made here
    config, dense = configs["dense"], unwrap_model(states["dense"].model)
    vision, language = config.model.vision, config.model.language
    tokenizer = load_tokenizer(config.data.tokenizer)
    special = [*tokenizer.hf.all_special_ids, dense.image_token_id]
    ids = packing.TokenIds(pad=tokenizer.pad_id, bos=tokenizer.bos_id, image=dense.image_token_id,
                           text=np.setdiff1d(np.arange(tokenizer.vocab_size), special))
    recipe = packing.PEER_RECIPES[mix]
    if peer_batch:
        recipe = dataclasses.replace(recipe, per_device_batch=peer_batch)
    drawn, official = packing.draw_samples(mix, samples, language.seq_length, vision.num_patches,
                                           vision.image_size, ids, config.train.seed, recipe)
    batches = packing.mode_batches(drawn, official, config.train.micro_batch_size,
                                   language.seq_length, tokenizer.pad_id, vision.image_size)
    runs = {f"{name}/{mode}": (lambda micro_batches, state=state: train_step(state, micro_batches),
                                   batches[mode])
            for name, state in states.items() for mode in packing.MEGAMOD_MODES}
    if "hf" in names:
        hf = Variant("hf", overrides["dense"], config)
        step_on = build_hf(hf, batches["dynamic"][:1], dense.image_token_id, dense,
                           attention="sdpa", attention_mask=True)
        runs.update({f"hf/{mode}": (step_on, batches[mode]) for mode in packing.PEER_MODES})
    # Model FLOPs as megamod counts them (StepFlops: padding computed, a packed row one sample).
    counters = {name: StepFlops(c, dense.language_model.vocab_size, dense.image_token_id)
                for name, c in configs.items()}
    tflops = {name: counters[name.split("/")[0].replace("hf", "dense")](b) / 1e12
              for name, (_, b) in runs.items()}
    epoch_times = packing.time_epochs(runs, warmup, epochs)
    figures = {mode: packing.mode_figures(b) for mode, b in batches.items()}
    results = packing.results(epoch_times, figures, tflops)
    lengths = [s.encoded.length for s in drawn]
    return {
        "data_mix": mix,
        "shape": shape_name,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "dtype": config.precision.params_dtype,
        "seq_length": language.seq_length,
        "image_tokens": vision.num_patches,
        "samples": len(drawn),
        "peer_recipe": dataclasses.asdict(recipe),
        "epochs": epochs,
        "warmup": warmup,
        "sample_lengths": lengths,
        "mean_length": sum(lengths) / len(lengths),
        "text_only_samples": sum(s.encoded.num_images == 0 for s in drawn),
        "truncated_samples": sum(s.encoded.truncated for s in drawn),
        "overrides": overrides,
        "modes": figures,
        "runs": results,
        "ratios": packing.ratios(results),
        "epoch_times_s": epoch_times,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--quick", action="store_true", help="the CPU-sized shape")
    shape.add_argument("--smoke", action="store_true", help="the tiny model (tests)")
    parser.add_argument("--steps", type=int, default=5, help="timed repetitions")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant")
    parser.add_argument("--variants", help=f"a subset of {','.join(VARIANTS)}, with dense "
                        f"(default: all; with --data-mix: {','.join(DATA_MIX_VARIANTS)})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every variant, after the shape's (repeatable)")
    parser.add_argument("--loader-steps", type=int, default=32,
                        help="loader steps timed for the loader figure (0: no loader figure)")
    parser.add_argument("--generation-tokens", type=int, default=8,
                        help="new tokens per generation timed (0: no generation figures)")
    parser.add_argument("--dry-run", action="store_true", help="print shapes and FLOPs only")
    parser.add_argument("--data-mix", choices=list(packing.MIXES),
                        help="instead: useful tokens/s on this mix's sample lengths, padded, "
                             "dynamically padded and packed (benchmarks/packing.py)")
    parser.add_argument("--samples", type=int, default=256,
                        help="--data-mix: samples (an epoch), rounded down to whole micro-batches "
                             "of the official run (16 for llava665k, 32 for stage1)")
    parser.add_argument("--peer-batch", type=int,
                        help="--data-mix: the official run's per-device batch instead of the recipe's")
    parser.add_argument("--epochs", type=int, default=1, help="--data-mix: timed epochs per run")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of results")
    args = parser.parse_args()

    shape_name = "quick" if args.quick else "smoke" if args.smoke else "default"
    names = (args.variants or ",".join(DATA_MIX_VARIANTS if args.data_mix else VARIANTS)).split(",")
    if set(names) - VARIANTS.keys() or "dense" not in names:
        parser.error(f"--variants: a subset of {list(VARIANTS)} with dense (it supplies the data)")
    variants = []
    for name in names:
        overrides = COMMON + SHAPES[shape_name] + args.set + VARIANTS[name]
        variants.append(Variant(name, overrides, load_config(BASE, overrides)))
    if args.dry_run:
        dry_run(variants)
        return
    if args.data_mix:
        if set(names) - set(DATA_MIX_VARIANTS):
            parser.error(f"--data-mix: --variants a subset of {','.join(DATA_MIX_VARIANTS)} with dense")
        summary = data_mix_benchmark(args.data_mix, names, shape_name, args.set, args.samples,
                                     args.epochs, args.warmup, args.peer_batch)
        packing.print_table(summary)
        if args.json:
            print(json.dumps(summary))
        return

    from megamod.parallel import destroy_distributed

    micro_batches, vocab_size, image_id = build(variants)
    losses = same_weights_losses(variants, micro_batches) if "hf" in names else None
    measure(variants, args.warmup, args.steps)
    generation = None
    if args.generation_tokens and {"dense", "mod"} <= set(names):
        generation = measure_generation(generators(variants), micro_batches, args.generation_tokens)
    destroy_distributed()
    # The models' peak, before the loader figure adds its decoder's memory (ru_maxrss: KiB).
    peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    dense = next(v for v in variants if v.name == "dense")
    loader = loader_rate(dense.overrides, args.loader_steps) if args.loader_steps else None

    config = variants[0].config
    tokens_per_step = config.train.global_batch_size * config.model.language.seq_length
    results = {v.name: results_of(v, tokens_per_step, device_peak_tflops()) for v in variants}
    images = [int(n) for b in micro_batches
              for n in (b["tokens"] == image_id).sum(1) // config.model.vision.num_patches]
    summary = {
        "shape": shape_name,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "dtype": config.precision.params_dtype,
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "warmup": args.warmup,
        "images_per_sample": images,
        "vocab_size": vocab_size,
        "overrides": {v.name: v.overrides for v in variants},
        "variants": results,
        "ratios": ratios(results, {v.name: v.config for v in variants}),
        "peak_rss_gib": peak_rss_gib,
    }
    if losses is not None:
        summary["same_weights_loss"] = losses
    if generation is not None:
        summary["generation"] = generation
        summary["ratios"].update(generation_ratios(generation))
    if loader is not None:
        step_images_per_s = sum(images) / results["dense"]["step_time_s"]
        summary["loader"] = {**loader, "step_images_per_s": step_images_per_s}
        summary["ratios"]["ratio_loader_vs_step"] = loader["images_per_s"] / step_images_per_s
    print_table(summary)
    if args.json:
        print(json.dumps(summary))


def print_table(summary: dict) -> None:
    print(f"{summary['device']}, {summary['dtype']}, {summary['threads']} threads; images per "
          f"sample {summary['images_per_sample']}; median of {summary['steps']} after "
          f"{summary['warmup']} warm-up")
    print(f"{'variant':8s} {'step s':>8s} {'min s':>7s} {'tokens/s':>9s} {'TFLOP/step':>10s} "
          f"{'TFLOP/s':>8s} {'MFU':>6s} {'step GiB':>8s}")
    for name, r in summary["variants"].items():
        mfu = f"{r['mfu']:6.1%}" if "mfu" in r else f"{'-':>6s}"
        memory = f"{r['step_memory_gib']:8.2f}" if "step_memory_gib" in r else f"{'-':>8s}"
        print(f"{name:8s} {r['step_time_s']:8.3f} {r['step_time_min_s']:7.3f} "
              f"{r['tokens_per_s']:9.0f} {r['tflops_per_step']:10.4f} {r['tflops_per_s']:8.4f} "
              f"{mfu} {memory}")
    for name, value in summary["ratios"].items():
        print(f"{name:24s} {value:.3f}")
    print(f"peak RSS of the process (all variants): {summary['peak_rss_gib']:.2f} GiB")
    if "same_weights_loss" in summary:
        losses = summary["same_weights_loss"]
        print(f"loss before any step, same weights: megamod {losses['megamod']:.6f}, "
              f"HF {losses['hf']:.6f}")
    for name, r in summary.get("generation", {}).items():
        print(f"generate {name:9s} prefill {r['prefill_s']:.4f} s, decode {r['decode_token_s']:.4f} "
              f"s/token, KV cache {r['kv_cache_bytes'] / 2**20:.2f} MiB")
    if "loader" in summary:
        loader = summary["loader"]
        print(f"loader ({loader['decoder']}, {loader['workers']} threads): "
              f"{loader['images_per_s']:.1f} images/s; the dense step consumes "
              f"{loader['step_images_per_s']:.2f} images/s")


if __name__ == "__main__":
    main()
