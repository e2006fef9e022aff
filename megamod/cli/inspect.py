"""`megamod inspect`: what a checkpoint holds, and where its MoE routers send tokens.

`megamod inspect CKPT_DIR [--json]` reads metadata only: the common state (iteration,
the parallel layout it was saved with, the run's config) and the global shapes of the
saved tensors (`dist_checkpointing.load_tensors_metadata`, no tensor data). Parameters
are counted per part: vision, projector, language (the decoder without its experts,
routers included) and experts; for MoE, the activated parameters per token as MoE-LLaVA
(arXiv 2401.15947) reports them: all but the experts, plus top-k / num_experts of them.

`--routing --data SHARDS [--batches N]` adds MoE-LLaVA's routing analysis (see
`megamod.moe.stats`): N global batches of SHARDS run through the model in eval mode, in
this process as a world of one, and the routers' statistics are printed per MoE layer
and per modality (all / text / image tokens): each expert's share of the tokens, and the
dropped fraction. With `--json` the report is one JSON object on the last line of stdout.

`megamod inspect CONFIG.yaml --flops [--images N] [--text-tokens T] [--json] [key=value ...]`
prints a
config's model FLOPs per sample (inference prefill and training) and its KV cache against
the same config with MoD off (`megamod.training.flops`): p-MoD's efficiency, before
training anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megamod.config import Config, MoEConfig
from megamod.errors import CheckpointError, MegamodError
from megamod.training.logging import silence_upstream_warnings

if TYPE_CHECKING:
    from megamod.data.tokenizer import Tokenizer

# Model tensors by key prefix (LLaVA's attribute names); other keys are optimizer state.
PARTS = {"vision_model.": "vision", "vision_projection.": "projector", "language_model.": "language"}
EXPERT_KEY = ".mlp.experts."  # megatron-core's MoELayer.experts, whatever the expert type


# ------------------------------------------------------------------------------ summary


def describe(save_dir: Path, config: Config) -> dict[str, Any]:
    """The checkpoint at a glance, as plain JSON-able values."""
    from megatron.core import dist_checkpointing

    from megamod.training import checkpoint

    iteration = checkpoint.read_latest_iteration(save_dir)
    ckpt_dir = checkpoint.iteration_dir(save_dir, iteration)
    common = checkpoint.check_intact(ckpt_dir)
    metadata = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))
    shapes = {key: tuple(tensor.global_shape) for key, tensor in metadata.items()}
    moe = config.moe
    pattern = moe.layer_pattern(config.model.language.num_layers)
    return {
        "checkpoint": str(save_dir),
        "iteration": iteration,
        "resumable": "scheduler" in common,  # weights-only checkpoints have none
        "parallel": common["parallel"],
        "model": dataclasses.asdict(config.model),
        "moe": None if moe.num_experts is None else {
            "num_experts": moe.num_experts,
            "router_topk": moe.router_topk,
            "moe_layers": [i for i, is_moe in enumerate(pattern) if is_moe],
            "capacity_factor": moe.capacity_factor,
        },
        "parameters": count_parameters(shapes, moe),
        # The model's tensors (optimizer state and RNG left out) as saved: global shapes.
        "tensors": {
            key: {"shape": list(shapes[key]), "dtype": str(tensor.dtype).removeprefix("torch.")}
            for key, tensor in sorted(metadata.items()) if key.startswith(tuple(PARTS))
        },
    }


def count_parameters(shapes: dict[str, tuple[int, ...]], moe: MoEConfig) -> dict[str, int]:
    """Parameters per part from the saved model tensors' global shapes; `activated` is
    what one token passes through (top-k of the experts of each MoE layer)."""
    counts = dict.fromkeys(["vision", "projector", "language", "experts"], 0)
    for key, shape in shapes.items():
        part = next((part for prefix, part in PARTS.items() if key.startswith(prefix)), None)
        if part == "language" and EXPERT_KEY in key:
            part = "experts"
        if part is not None:
            counts[part] += math.prod(shape)
    counts["total"] = sum(counts.values())
    # Experts are equal in size, so the top-k share of them is a whole number.
    active_experts = counts["experts"] * moe.router_topk // moe.num_experts if moe.num_experts else 0
    counts["activated"] = counts["total"] - counts["experts"] + active_experts
    return counts


def format_summary(summary: dict[str, Any], with_tensors: bool = False) -> str:
    vision, language = summary["model"]["vision"], summary["model"]["language"]
    moe, params = summary["moe"], summary["parameters"]
    weights_only = "" if summary["resumable"] else " (model weights only: checkpoint.finetune=true)"
    groups = language["num_query_groups"] or language["num_attention_heads"]
    lines = [
        f"checkpoint  {summary['checkpoint']}, iteration {summary['iteration']}{weights_only}",
        "saved with  " + " ".join(f"{k}={v}" for k, v in summary["parallel"].items()),
        f"vision      {vision['num_layers']} layers (feature layer {vision['feature_layer']}), "
        f"hidden {vision['hidden_size']}, {vision['image_size']} px in patches of {vision['patch_size']}",
        f"language    {language['num_layers']} layers, hidden {language['hidden_size']}, ffn "
        f"{language['ffn_hidden_size']}, {language['num_attention_heads']} heads in {groups} "
        f"query groups, sequence {language['seq_length']}",
        "moe         " + ("none (dense)" if moe is None else
                          f"{moe['num_experts']} experts, top-{moe['router_topk']}, on layers "
                          f"{moe['moe_layers']}, capacity factor "
                          f"{moe['capacity_factor'] or 'none (dropless)'}"),
        "parameters",
    ]
    rows = [("vision", ""), ("projector", ""), ("language", "decoder"), ("total", "")]
    if moe is not None:
        rows = [("vision", ""), ("projector", ""), ("language", "decoder without experts"),
                ("experts", ""), ("total", ""), ("activated", "per token")]
    lines += [f"  {name:<10} {params[name]:>15,}  {note}".rstrip() for name, note in rows]
    if with_tensors:
        lines.append(f"tensors ({len(summary['tensors'])})")
        lines += [f"  {key}  {tuple(t['shape'])}  {t['dtype']}" for key, t in summary["tensors"].items()]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ routing


def route(save_dir: Path, saved: Config, shards: str, batches: int) -> dict[str, Any]:
    """Run `batches` global batches of `shards` through the checkpoint's model (eval, no
    grad) as a world of one; returns the routers' statistics."""
    from megamod.data.tokenizer import load_tokenizer
    from megamod.models.build import one_process_config
    from megamod.parallel import world_of_one
    from megamod.training.checkpoint import tokenizer_of

    tokenizer = load_tokenizer(tokenizer_of(save_dir, saved))
    config = one_process_config(saved, tokenizer.vocab_size)
    config = dataclasses.replace(
        config, data=dataclasses.replace(config.data, train_shards=shards, mixture=[])
    )
    with world_of_one(config.parallel, config.train.seed, "inspect --routing"):
        return _route(save_dir, config, tokenizer, batches)


def _route(save_dir: Path, config: Config, tokenizer: Tokenizer, batches: int) -> dict[str, Any]:
    import torch

    from megamod.data.loader import build_train_loader, prepare_tiny_shards
    from megamod.models.build import build_model
    from megamod.moe.stats import MODALITIES
    from megamod.precision import DTYPES
    from megamod.training.checkpoint import load_model_weights

    model = build_model(config, tokenizer)
    load_model_weights(save_dir, model)
    # In the dtype training ran in, as `megamod generate` runs it: bf16/fp16 training wraps
    # the model in megatron-core's Float16Module, which casts all of it and its inputs
    # (the routers compute in moe.router_dtype on their own).
    dtype = DTYPES[config.precision.params_dtype]
    model.to(dtype).eval()
    device = next(model.parameters()).device
    stats = model.routing_stats
    stats.reset()
    if config.data.train_shards == "tiny":
        prepare_tiny_shards()
    loader = build_train_loader(config, tokenizer, dp_rank=0, dp_size=1)
    with loader, torch.no_grad():
        for _ in range(batches):
            for batch in loader.next_step():
                # Padding (and packed rows' boundaries) as in training: padding routes nowhere.
                inputs = {k: v.to(device) for k, v in batch.items() if k not in ("labels", "loss_mask")}
                model(**inputs | {"images": inputs["images"].to(dtype)})
    tokens = stats.tokens[stats.moe_layers].cpu()  # [MoE layers, modality]
    return {
        "data": config.data.train_shards,
        "batches": batches,
        "moe_layers": stats.moe_layers,
        "tokens": {m: [int(n) for n in tokens[:, i]] for i, m in enumerate(MODALITIES)},
        "load": {"all": stats.load().tolist(), **{m: stats.load(m).tolist() for m in MODALITIES}},
        "dropped_fraction": stats.dropped_fraction().tolist(),
    }


def format_routing(report: dict[str, Any]) -> str:
    """One block per modality: a row per MoE layer, a column per expert."""
    tokens = report["tokens"]
    tokens = {"all": [t + i for t, i in zip(tokens["text"], tokens["image"])], **tokens}
    lines = [f"routing: {report['batches']} batches of {report['data']}, share of the tokens "
             f"each expert receives"]
    for modality, load in report["load"].items():
        experts = "".join(f"{f'e{j}':>7}" for j in range(len(load[0])))
        dropped = f"{'dropped':>9}" if modality == "all" else ""
        lines += ["", f"{modality} tokens", f"{'layer':>5}{'tokens':>10}{experts}{dropped}"]
        for row, (layer, shares) in enumerate(zip(report["moe_layers"], load)):
            cells = "".join(f"{share:>7.3f}" for share in shares)
            dropped = f"{report['dropped_fraction'][row]:>9.3f}" if modality == "all" else ""
            lines.append(f"{layer:>5}{tokens[modality][row]:>10}{cells}{dropped}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------- flops


def flops_report(config: Config, images: int, text_tokens: int) -> dict[str, Any]:
    """FLOPs and KV cache of one sample with `images` images and `text_tokens` other
    tokens, with the config's MoD and with MoD off."""
    from megamod.training.flops import Sample, kv_cache_bytes, sample_flops

    from megamod.data.tokenizer import load_tokenizer
    from megamod.models.build import vocab_size

    # A config that fixes its vocabulary needs no tokenizer folder for the arithmetic.
    tokens = config.model.language.vocab_size or load_tokenizer(config.data.tokenizer).vocab_size
    vocab = vocab_size(config, tokens)
    sample = Sample(images, images * config.model.vision.num_patches + text_tokens)
    dense = dataclasses.replace(config, mod=dataclasses.replace(config.mod, enabled=False))
    prefill = sample_flops(config, sample, vocab, training=False)
    prefill_dense = sample_flops(dense, sample, vocab, training=False)
    kv, kv_dense = kv_cache_bytes(config, sample), kv_cache_bytes(dense, sample)
    return {
        "images": images,
        "text_tokens": text_tokens,
        "tflops_per_sample": prefill / 1e12,
        "tflops_per_sample_dense": prefill_dense / 1e12,
        "flops_ratio": prefill / prefill_dense,
        "training_tflops_per_sample": sample_flops(config, sample, vocab) / 1e12,
        "training_tflops_per_sample_dense": sample_flops(dense, sample, vocab) / 1e12,
        "kv_cache_bytes": kv,
        "kv_cache_bytes_dense": kv_dense,
        "kv_cache_ratio": kv / kv_dense,
    }


def format_flops(report: dict[str, Any]) -> str:
    return "\n".join([
        f"one sample: {report['images']} image(s) + {report['text_tokens']} other tokens",
        f"{'':24}{'this config':>14}{'MoD off':>14}{'ratio':>8}",
        f"{'prefill TFLOPs':<24}{report['tflops_per_sample']:>14.4f}"
        f"{report['tflops_per_sample_dense']:>14.4f}{report['flops_ratio']:>8.3f}",
        f"{'training TFLOPs':<24}{report['training_tflops_per_sample']:>14.4f}"
        f"{report['training_tflops_per_sample_dense']:>14.4f}",
        f"{'KV cache (bf16) MiB':<24}{report['kv_cache_bytes'] / 2**20:>14.2f}"
        f"{report['kv_cache_bytes_dense'] / 2**20:>14.2f}{report['kv_cache_ratio']:>8.3f}",
    ])


# ---------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megamod inspect",
        description="Describe a megamod checkpoint; with --routing, where its MoE routers send tokens.",
    )
    parser.add_argument("checkpoint", type=Path,
                        help="a checkpoint.save_dir (holding latest_checkpointed_iteration.txt);"
                        " with --flops, a config file")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="with --flops: config overrides, as `megamod train` takes them")
    parser.add_argument("--tensors", action="store_true",
                        help="list the model's tensors with their shapes and dtypes")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (the last line of stdout)")
    parser.add_argument("--routing", action="store_true",
                        help="MoE-LLaVA's routing analysis (needs --data)")
    parser.add_argument("--data", metavar="SHARDS",
                        help="shards to route, as data.train_shards takes them ('tiny', a folder, a glob)")
    parser.add_argument("--batches", type=int, default=8,
                        help="global batches to route (default 8)")
    parser.add_argument("--flops", action="store_true",
                        help="FLOPs and KV cache of a config's sample, against MoD off")
    parser.add_argument("--images", type=int, default=1, help="with --flops (default 1)")
    parser.add_argument("--text-tokens", type=int, default=64,
                        help="with --flops: the prompt's other tokens (default 64)")
    return parser


def _flops_main(args: argparse.Namespace) -> int:
    from megamod.config import load_config

    try:
        config = load_config(args.checkpoint, args.overrides)
        report = flops_report(config, args.images, args.text_tokens)
    except MegamodError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else format_flops(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`megamod inspect`: 0 on success, 2 (one-line message on stderr) on bad input."""
    parser = _parser()
    args = parser.parse_intermixed_args(argv)
    if args.routing != (args.data is not None):
        parser.error("--routing and --data SHARDS go together")
    if args.batches < 1:
        parser.error("--batches must be >= 1")
    if args.overrides and not args.flops:
        parser.error("config overrides go with --flops")
    silence_upstream_warnings()  # before megatron-core is imported
    if args.flops:
        return _flops_main(args)
    from megamod.training.checkpoint import saved_config

    try:
        if args.checkpoint.is_file():
            raise CheckpointError(
                f"{args.checkpoint} is a file, not a checkpoint (a checkpoint.save_dir "
                f"folder); for a config's FLOPs and KV cache add --flops: megamod inspect "
                f"{args.checkpoint} --flops"
            )
        config = saved_config(args.checkpoint)
        summary = describe(args.checkpoint, config)
        if args.routing and summary["moe"] is None:
            raise CheckpointError(
                f"{args.checkpoint} has no MoE layers (a dense model: moe.num_experts is "
                f"null), so --routing has nothing to analyse; `megamod upcycle` turns it into "
                f"a MoE model"
            )
        if args.routing:
            summary["routing"] = route(args.checkpoint, config, args.data, args.batches)
    except MegamodError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary))
    else:
        print(format_summary(summary, args.tensors))
        if args.routing:
            print("\n" + format_routing(summary["routing"]))
    return 0
