"""Dense -> MoE upcycling: MoE-LLaVA's step from stage 2 to stage 3 (`megamod upcycle`).

MoE-LLaVA (arXiv 2401.15947, MoE-Tuning stage III) starts each MoE layer from the dense
LVLM of stage 2: every expert is a copy of that layer's FFN and the router (gate) is
freshly initialised; every other tensor is taken over unchanged. With identical experts
and the top-k probabilities normalised over the chosen experts (megatron-core's default,
`moe_router_pre_softmax=False`), an MoE layer computes `sum_k p_k FFN(x) = FFN(x)`: as
long as no token is dropped, stage 3 starts from exactly the stage-2 model's outputs.

megatron-core has the same step (`transformer/moe/upcycling_utils.py`, granular
upcycling, arXiv 2410.07524). At granularity 1 with softmax after top-k it also makes
plain copies, but it is not called here:
- it expands the FFN keys of EVERY layer, dense ones included (and the ViT's), so an
  alternating dense/MoE decoder (MoE-LLaVA's) gets expert keys that do not exist;
- it takes the first module named `mlp` as the MoE layer; in LLaVA that is the ViT's.
Instead each tensor of the MoE model names its dense source (`upcycle_state_dict`):
the same name, or for an expert its layer's FFN, under both expert layouts upstream
knows (`SequentialMLP`: `mlp.experts.local_experts.{e}.linear_fc1.weight`;
`TEGroupedMLP`: `mlp.experts.linear_fc1.weight{e}`), and for a MoE layer's pre-MLP norm
the dense layer's (the same name with local modules; fused into fc1 as
`mlp.linear_fc1.layer_norm_weight` with transformer-engine). Upstream keeps the routers
the MoE model was built with; here they are drawn from a generator seeded with `--seed`
(normal, std `init_method_std`, as megatron-core initialises them), so the seed alone
decides them.

Runs as one process (a world of one). The output is a weights-only checkpoint at
iteration 0 (stage 3 counts its own steps) that `megamod train ... checkpoint.load=OUT
checkpoint.finetune=true` loads at any TP/EP.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
import yaml

from megamod.config import Config, build_dataclass
from megamod.data.tokenizer import load_tokenizer
from megamod.errors import CheckpointError, MegamodError
from megamod.parallel import world_of_one
from megamod.training.logging import silence_upstream_warnings

if TYPE_CHECKING:
    from megamod.models.llava import LLaVA

# megatron-core (imported by megamod.training.checkpoint, .loop and megamod.models) is
# imported inside the functions, after `main` has filtered its import-time warnings.

# MoE-model key -> its dense source, for the tensors that change name.
_RENAMES = tuple((re.compile(pattern), replacement) for pattern, replacement in (
    (r"\.mlp\.experts\.local_experts\.\d+\.(linear_fc[12]\.(?:weight|bias))$", r".mlp.\1"),
    (r"\.mlp\.experts\.(linear_fc[12]\.(?:weight|bias))\d+$", r".mlp.\1"),
    (r"\.pre_mlp_layernorm\.(weight|bias)$", r".mlp.linear_fc1.layer_norm_\1"),
))


def _fresh(key: str) -> bool:
    """Tensors the MoE model keeps as built: routers, and transformer-engine's FP8 state."""
    return ".mlp.router." in key or key.endswith("_extra_state")


def _dense_source(key: str, dense_keys: Mapping[str, Any]) -> str | None:
    if key in dense_keys:
        return key
    for pattern, replacement in _RENAMES:
        source = pattern.sub(replacement, key)
        if source != key and source in dense_keys:
            return source
    return None


def upcycle_state_dict(
    dense: Mapping[str, Any], moe: Mapping[str, Any]
) -> dict[str, Any]:
    """The MoE model's tensors taken from the dense model, by MoE key: same-named tensors,
    each expert's fc1/fc2 from its layer's FFN, each MoE layer's pre-MLP norm from the
    dense layer's. Routers are left out (they start fresh). Raises if a tensor of either
    model has no counterpart: a model layout this mapping does not know."""
    result: dict[str, Any] = {}
    unused = {key for key in dense if not key.endswith("_extra_state")}
    for key, value in moe.items():
        if _fresh(key):
            continue
        source = _dense_source(key, dense)
        if source is None or dense[source].shape != value.shape:
            shape = tuple(value.shape)
            raise RuntimeError(f"upcycling found no dense tensor of shape {shape} for {key}")
        result[key] = dense[source]
        unused.discard(source)
    if unused:
        raise RuntimeError(f"upcycling left dense tensors unused: {sorted(unused)}")
    return result


def upcycle_model(dense: torch.nn.Module, moe: LLaVA, seed: int) -> int:
    """Copy `dense` (a dense LLaVA) into `moe` (the same LLaVA with MoE layers) in place and
    draw the routers from `seed`. Returns the number of routers initialised."""
    moe_state = moe.state_dict()  # detached views of the parameters
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in upcycle_state_dict(dense.state_dict(), moe_state).items():
            moe_state[key].copy_(tensor)
        routers = moe.routers()
        for router in routers:
            weight = torch.empty(router.weight.shape, dtype=torch.float32)
            weight.normal_(0.0, moe.config.init_method_std, generator=generator)
            router.weight.copy_(weight)
    return len(routers)


def _progress(message: str) -> None:
    print(f"upcycle: {message}", flush=True)


def _read_dense_config(input_dir: Path) -> Config:
    """The input's config; refuses a missing, config-less or already-MoE checkpoint."""
    from megamod.training.checkpoint import (
        TRACKER_FILE,
        iteration_dir,
        read_latest_iteration,
        saved_config,
    )

    tracker = input_dir / TRACKER_FILE
    if not tracker.is_file():
        raise CheckpointError(
            f"--input {input_dir}: {tracker} does not exist: give the checkpoint.save_dir of "
            f"a dense (stage-2) run"
        )
    ckpt_dir = iteration_dir(input_dir, read_latest_iteration(input_dir))
    config = saved_config(input_dir)
    if config is None:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} holds no config (written before megamod stored it): "
            f"load it into a current megamod run (checkpoint.finetune=true) and save it again"
        )
    if config.moe.num_experts is not None:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} is already a MoE model (moe.num_experts="
            f"{config.moe.num_experts} in its config): upcycle a dense (stage-2) checkpoint"
        )
    return config


def _check_output(output: Path, input_dir: Path, force: bool) -> None:
    if output.resolve() == input_dir.resolve():
        raise CheckpointError(f"--output {output} is the input: write the MoE checkpoint elsewhere")
    if output.exists() and not force and (not output.is_dir() or any(output.iterdir())):
        raise CheckpointError(
            f"--output {output} exists and is not empty: choose another directory or pass "
            f"--force to replace it"
        )


def _build_configs(
    dense: Config, vocab_size: int, num_experts: int, layer_freq: int | list[int], router_topk: int
) -> tuple[Config, Config]:
    """(dense, MoE) configs to build at TP=1 (a world of one), with the vocabulary the
    input was padded to at its own TP. The experts copy the dense FFN: they have its width."""
    raw = dataclasses.asdict(dense)
    raw["parallel"] = {}
    raw["model"]["language"]["vocab_size"] = vocab_size
    dense = build_dataclass(Config, raw, prefix="")
    raw["moe"].update(num_experts=num_experts, layer_freq=layer_freq, router_topk=router_topk,
                      ffn_hidden_size=None)
    return dense, build_dataclass(Config, raw, prefix="")


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
    start = time.perf_counter()
    output = output.resolve()  # "." or ".." has no name to stage beside
    dense_config = _read_dense_config(input_dir)
    _check_output(output, input_dir, force)
    seed = dense_config.train.seed if seed is None else seed

    from megamod.models.llava import padded_vocab_size
    from megamod.training.checkpoint import load_model_weights, save_checkpoint
    from megamod.training.loop import build_model

    tokenizer = load_tokenizer(dense_config.data.tokenizer)
    language, tp = dense_config.model.language, dense_config.parallel.tensor_model_parallel_size
    vocab_size = language.vocab_size or padded_vocab_size(
        tokenizer.vocab_size, language.make_vocab_size_divisible_by, tp
    )
    dense_config, moe_config = _build_configs(
        dense_config, vocab_size, num_experts, layer_freq, router_topk
    )

    # Written beside the output and renamed when complete: a failure leaves no output.
    staging = output.parent / f".{output.name}.upcycling"
    if staging.exists():  # left by a killed run
        shutil.rmtree(staging)
    with world_of_one(moe_config.parallel, seed, "upcycle"):
        _progress(f"loading the dense model from {input_dir}")
        dense = build_model(dense_config, tokenizer)
        iteration = load_model_weights(input_dir, dense)
        pattern = moe_config.moe.layer_pattern(language.num_layers)
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
    if output.is_dir():
        shutil.rmtree(output)
    elif output.exists():
        output.unlink()
    os.replace(staging, output)
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
