"""`megamod upcycle`: a dense (MoE-LLaVA stage-2) checkpoint -> a MoE one (stage 3).

    megamod upcycle --input SAVE_DIR --output SAVE_DIR --num-experts N --layer-freq K
        [--router-topk K] [--seed S] [--force]

How tensors map and routers start: `megamod.moe.upcycle`. Runs as one process (a world of
one). The output is a weights-only checkpoint at iteration 0 (stage 3 counts its own
steps) that `megamod train ... checkpoint.load=OUT checkpoint.finetune=true` loads at any
TP/EP, written whole or not at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import yaml

from megamod.cli.output import check_output, staged
from megamod.config import Config, build_dataclass
from megamod.data.tokenizer import load_tokenizer
from megamod.errors import CheckpointError, MegamodError
from megamod.parallel import world_of_one
from megamod.training.logging import silence_upstream_warnings

# megatron-core (imported by megamod.training.checkpoint and megamod.models) is imported
# inside the functions, after `main` has filtered its import-time warnings.


def _progress(message: str) -> None:
    print(f"upcycle: {message}", flush=True)


def _read_dense_config(input_dir: Path) -> Config:
    """The input's config; refuses a missing or already-MoE checkpoint."""
    from megamod.training.checkpoint import saved_config

    config = saved_config(input_dir)
    if config.moe.num_experts is not None:
        raise CheckpointError(
            f"checkpoint {input_dir} is already a MoE model (moe.num_experts="
            f"{config.moe.num_experts} in its config): upcycle a dense (stage-2) checkpoint"
        )
    return config


def _moe_config(dense: Config, num_experts: int, layer_freq: int | list[int], router_topk: int) -> Config:
    """`dense` (a one-process config) with MoE layers whose experts copy the dense FFN:
    they have its width."""
    raw = dataclasses.asdict(dense)
    raw["moe"].update(num_experts=num_experts, layer_freq=layer_freq, router_topk=router_topk,
                      ffn_hidden_size=None)
    return build_dataclass(Config, raw, prefix="")


def upcycle(
    input_dir: Path,
    output: Path,
    num_experts: int,
    layer_freq: int | list[int],
    router_topk: int = 2,
    seed: int | None = None,
    force: bool = False,
) -> None:
    """Write the MoE version of the dense checkpoint `input_dir` to `output` (a save_dir),
    whole or not at all. `seed` None: the input's train.seed."""
    from megamod.models.build import build_model, one_process_config
    from megamod.moe.upcycle import upcycle_model
    from megamod.training.checkpoint import load_model_weights, save_checkpoint, tokenizer_of

    start = time.perf_counter()
    check_output(output, [input_dir], force)
    saved = _read_dense_config(input_dir)
    seed = saved.train.seed if seed is None else seed
    tokenizer = load_tokenizer(tokenizer_of(input_dir, saved))
    dense_config = one_process_config(saved, tokenizer.vocab_size)
    moe_config = _moe_config(dense_config, num_experts, layer_freq, router_topk)
    with staged(output) as staging, world_of_one(moe_config.parallel, seed, "upcycle"):
        _progress(f"loading the dense model from {input_dir}")
        dense = build_model(dense_config, tokenizer)
        iteration = load_model_weights(input_dir, dense)
        pattern = moe_config.moe.layer_pattern(dense_config.model.language.num_layers)
        _progress(
            f"iteration {iteration}: {num_experts} experts (top-{router_topk}) on decoder "
            f"layers {[i for i, is_moe in enumerate(pattern) if is_moe]} of {len(pattern)}"
        )
        moe = build_model(moe_config, tokenizer)
        routers = upcycle_model(dense, moe, seed)
        del dense
        _progress(f"experts copied from the dense FFNs, {routers} routers drawn with seed {seed}")
        _progress(f"saving to {output}")
        save_checkpoint(staging, 0, moe, None, None, {}, moe_config)
    _progress(f"done in {time.perf_counter() - start:.0f} s: {output}")


def _layer_freq(text: str) -> int | list[int]:
    value = yaml.safe_load(text)
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give an int K (MoE on layers 0, K, 2K, ...) or a 0/1 list per layer "
            f"like [1,0,1,0]"
        )
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megamod upcycle",
        description="Turn a dense (MoE-LLaVA stage-2) checkpoint into a MoE one (stage 3): "
        "each MoE layer's experts are copies of the dense FFN, its router is new.",
    )
    p.add_argument("--input", type=Path, required=True, help="save_dir of the dense run")
    p.add_argument("--output", type=Path, required=True, help="save_dir to write (weights only)")
    p.add_argument("--num-experts", type=int, required=True,
                   help="experts per MoE layer (MoE-LLaVA: 4)")
    p.add_argument("--layer-freq", type=_layer_freq, required=True,
                   help="K: MoE on layers 0, K, 2K, ... (MoE-LLaVA: 2); or a list like [1,0,1,0]")
    p.add_argument("--router-topk", type=int, default=2, help="experts per token (default 2)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the routers' initialisation (default: the input's train.seed)")
    p.add_argument("--force", action="store_true", help="replace an existing --output")
    return p


def main(argv: list[str] | None = None) -> int:
    """`megamod upcycle`: 0 on success, 2 (one-line message on stderr) on bad input."""
    args = _parser().parse_args(argv)
    silence_upstream_warnings()
    try:
        upcycle(args.input, args.output, args.num_experts, args.layer_freq,
                args.router_topk, args.seed, args.force)
    except MegamodError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
