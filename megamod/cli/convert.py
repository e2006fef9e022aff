"""`megamod convert`: Hugging Face LLaVA checkpoints <-> megamod checkpoints.

    megamod convert --from hf --to megamod --input HF_DIR --output CKPT_DIR [--tp N]
    megamod convert --from megamod --to hf --input CKPT_DIR --output HF_DIR
    megamod convert --from hf-parts --vision CLIP_DIR --language LM_DIR --output CKPT_DIR [--tp N]

The tensor mapping is `megamod.convert.hf` (pure state-dict adapters); this command reads
and writes the files and builds megamod's model. One process (a world of one) on CPU: the
model is built at TP=1 with megatron-core's local layer specs (the adapters' names; CUDA
is hidden from the process so transformer-engine's are never picked), loaded and saved by
megamod's own checkpoint code. Nothing is written under the output's name until all of it
is complete.

An import writes a weights-only checkpoint at iteration 0 (a save_dir, like `megamod
upcycle`'s) that `checkpoint.load=CKPT_DIR checkpoint.finetune=true` loads at any TP/EP;
the source's tokenizer (with `<image>` added if it lacked one) in `CKPT_DIR/tokenizer/`;
and `CKPT_DIR/model.yaml` (the `model` section, `data.tokenizer` and `checkpoint.load`), a
config to train from as it is or to name as a stage config's `base:`. Weights keep their
dtype (`precision.params_dtype` in the saved config; a run of another dtype loads them
cast). `hf-parts` (LLaVA / MoE-LLaVA stage 1) gets a freshly initialised projector and
the LM's tokenizer. `--tp N` pads the vocabulary with zero rows, when its size does not
divide by N, to a multiple of `model.language.make_vocab_size_divisible_by` x N (as
Megatron-LM pads): the checkpoint loads at every TP size that divides its vocabulary.

An export writes `model.safetensors` (the hub's llava-1.5 layout), `config.json` and the
checkpoint's tokenizer; see `megamod.convert.hf` for what changes (the ViT's unbuilt
layers) and the MoE layout. Memory: the source's tensors plus the model, in their dtype.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pickle
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
import yaml

from megamod.cli.output import check_output, staged
from megamod.config import Config, LanguageConfig, build_dataclass
from megamod.convert.hf import StateDict, from_hf, from_hf_parts, module_names, pad_vocab, to_hf
from megamod.data.tokenizer import Tokenizer, load_tokenizer
from megamod.errors import CheckpointError, MegamodError

if TYPE_CHECKING:
    from megamod.models.llava import LLaVA

# megatron-core is imported inside the functions, after `main` has hidden CUDA and
# filtered its import-time warnings.

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
            "pytorch_model.bin.index.json")


def _progress(message: str) -> None:
    print(f"convert: {message}", flush=True)


# ------------------------------------------------------------------------------ reading


def _read_weights(folder: Path) -> StateDict:
    """All tensors of a Hugging Face checkpoint folder (safetensors or PyTorch, sharded or not)."""
    name = next((n for n in _WEIGHTS if (folder / n).is_file()), None)
    if name is None:
        raise CheckpointError(
            f"{folder} holds no weights: expected one of {', '.join(_WEIGHTS)} (a folder "
            f"written by save_pretrained)"
        )
    files = [folder / name]
    if name.endswith(".index.json"):
        try:
            weight_map = json.loads(files[0].read_text())["weight_map"]
            files = [folder / shard for shard in sorted(set(weight_map.values()))]
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(
                f"{files[0]} is damaged: not the JSON index save_pretrained writes (a "
                f"\"weight_map\" of tensor -> file): copy it again"
            ) from None
    state: StateDict = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{file} is missing (named by {folder / name})")
        state.update(_read_weight_file(file))
    return state


def _read_weight_file(file: Path) -> StateDict:
    """One safetensors or PyTorch weights file; a truncated or garbled one is the user's
    to replace."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if file.suffix == ".safetensors":
            return load_file(file)
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except (SafetensorError, RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise CheckpointError(
            f"{file} is damaged (truncated, or not a {file.suffix} weights file): "
            f"{str(e).splitlines()[0][:200]}: copy it again from where it came from"
        ) from None


def _read_hf_config(folder: Path) -> dict[str, Any]:
    """config.json with transformers' defaults filled in (and old fields updated)."""
    from transformers import AutoConfig

    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: give a folder written by save_pretrained")
    try:
        return AutoConfig.from_pretrained(str(folder), local_files_only=True).to_dict()
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a config transformers can read: {e}") from None


def _read_hf(folder: Path) -> tuple[StateDict, dict[str, Any]]:
    if not folder.is_dir():
        raise CheckpointError(f"{folder} does not exist: give a Hugging Face model folder")
    return _read_weights(folder), _read_hf_config(folder)


@contextlib.contextmanager
def _naming(path: str) -> Iterator[None]:
    """A CheckpointError of the adapters (which know no files) says which input it is about."""
    try:
        yield
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


# ------------------------------------------------------------------------------ output


# ------------------------------------------------------------------------------ model


def _load(model: LLaVA, state: StateDict, source: Path, fresh: tuple[str, ...] = ()) -> None:
    """Copy `state` into `model`; tensors named `fresh*` keep the model's initialisation."""
    own = model.state_dict()
    state = module_names(state, own.keys())  # the model's own names, whichever spec built it
    for key, tensor in state.items():
        if key in own and own[key].shape != tensor.shape:
            raise CheckpointError(
                f"{source}: tensor shapes disagree with its config.json: {key} would be "
                f"{tuple(own[key].shape)} but is {tuple(tensor.shape)}"
            )
    kept = {k: v for k, v in own.items() if k.endswith("_extra_state") or k.startswith(fresh)}
    model.load_state_dict({**kept, **state}, strict=True)


def _vocab_rows(rows: int, tokenizer_size: int, tp: int) -> int:
    """The source's rows when they cover the tokenizer and split over `tp` ranks, else
    Megatron-LM's padding."""
    from megamod.models.build import padded_vocab_size

    if rows >= tokenizer_size and rows % tp == 0:
        return rows
    divisible_by = LanguageConfig.make_vocab_size_divisible_by
    return padded_vocab_size(max(rows, tokenizer_size), divisible_by, tp)


def _write_megamod(
    state: StateDict,
    raw: dict[str, Any],
    tokenizer: Tokenizer,
    output: Path,
    tp: int,
    source: Path,
    fresh: tuple[str, ...] = (),
) -> None:
    """Build megamod's model from `raw` (the adapters' config), load `state`, save it as a
    weights-only checkpoint with the tokenizer and model.yaml beside it."""
    from megamod.models.build import build_model
    from megamod.parallel import world_of_one
    from megamod.training.checkpoint import save_checkpoint

    language = raw["model"]["language"]
    rows = _vocab_rows(language["vocab_size"], tokenizer.vocab_size, tp)
    if rows != language["vocab_size"]:
        _progress(f"vocabulary padded from {language['vocab_size']} to {rows} rows (--tp {tp})")
        state, language["vocab_size"] = pad_vocab(state, rows), rows
    output = output.resolve()
    raw["data"] = {"tokenizer": str(output / "tokenizer")}
    config = build_dataclass(Config, raw, prefix="")
    with staged(output) as staging:
        tokenizer.hf.save_pretrained(str(staging / "tokenizer"))
        with world_of_one(config.parallel, config.train.seed, "convert"):
            model = build_model(config, tokenizer)
            _load(model, state, source, fresh)
            _progress(f"saving to {output}")
            save_checkpoint(staging, 0, model, None, None, {}, config)
        usable = {k: raw[k] for k in ("model", "moe", "data") if raw.get(k)}
        usable["checkpoint"] = {"load": str(output), "finetune": True}
        (staging / "model.yaml").write_text(
            f"# Written by `megamod convert` from {source}: train from it as it is, or name it\n"
            f"# as a stage config's `base:`.\n" + yaml.safe_dump(usable, sort_keys=False)
        )


# ------------------------------------------------------------------------------ commands


def _tokenizer_of(folder: Path) -> Tokenizer:
    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
        raise CheckpointError(
            f"{folder} holds no tokenizer (tokenizer.json or tokenizer.model): copy the "
            f"model's tokenizer files into it"
        )
    return load_tokenizer(str(folder))


def hf_to_megamod(input_dir: Path, output: Path, tp: int) -> None:
    """A LlavaForConditionalGeneration folder -> a megamod checkpoint."""
    state, hf_config = _read_hf(input_dir)
    tokenizer = _tokenizer_of(input_dir)
    with _naming(str(input_dir)):
        state, raw = from_hf(state, hf_config)
    if tokenizer.image_token_id != hf_config["image_token_index"]:
        raise CheckpointError(
            f"{input_dir}: the tokenizer's <image> token is id {tokenizer.image_token_id} but "
            f"config.json's image_token_index is {hf_config['image_token_index']}: give the "
            f"tokenizer the model was trained with"
        )
    _write_megamod(state, raw, tokenizer, output, tp, input_dir)


def hf_parts_to_megamod(vision_dir: Path, language_dir: Path, output: Path, tp: int) -> None:
    """A CLIP vision tower + a Llama-family causal LM -> a megamod checkpoint (fresh projector)."""
    vision_state, vision_config = _read_hf(vision_dir)
    text_state, text_config = _read_hf(language_dir)
    tokenizer = _tokenizer_of(language_dir)
    # The adapter calls the LM's config `text_config`, the CLIP config `vision_config`.
    with _naming(f"{vision_dir} + {language_dir}"):
        state, raw = from_hf_parts(vision_state, vision_config, text_state, text_config)
    del vision_state, text_state
    _write_megamod(state, raw, tokenizer, output, tp, language_dir, fresh=("vision_projection.",))


def megamod_to_hf(input_dir: Path, output: Path) -> None:
    """A megamod checkpoint (its latest iteration) -> a LlavaForConditionalGeneration folder."""
    from safetensors.torch import save_file

    from megamod.models.build import build_model, one_process_config
    from megamod.parallel import world_of_one
    from megamod.training.checkpoint import load_model_weights, saved_config, tokenizer_of

    saved = saved_config(input_dir)
    tokenizer = load_tokenizer(tokenizer_of(input_dir, saved))
    config = one_process_config(saved, tokenizer.vocab_size)
    with staged(output) as staging, world_of_one(config.parallel, config.train.seed, "convert"):
        model = build_model(config, tokenizer)
        iteration = load_model_weights(input_dir, model)
        _progress(f"iteration {iteration} of {input_dir}")
        state, hf_config = to_hf(model.state_dict(), config, tokenizer.image_token_id)
        hf_config["text_config"].update(
            bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
            pad_token_id=tokenizer.pad_id,
        )
        _progress(f"saving to {output}")
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        tokenizer.hf.save_pretrained(str(staging))


# ------------------------------------------------------------------------------ CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megamod convert",
        description="Convert Hugging Face LLaVA checkpoints (LlavaForConditionalGeneration, "
        "or a CLIP vision tower + a Llama-family LM) to megamod checkpoints and back.",
    )
    p.add_argument("--from", dest="source", required=True, choices=["hf", "hf-parts", "megamod"])
    p.add_argument("--to", dest="target", default=None, choices=["megamod", "hf"],
                   help="default: the other format")
    p.add_argument("--input", type=Path,
                   help="the HF folder (--from hf) or save_dir (--from megamod)")
    p.add_argument("--vision", type=Path,
                   help="--from hf-parts: a CLIPVisionModel / CLIPModel folder")
    p.add_argument("--language", type=Path, help="--from hf-parts: a Llama-family causal LM folder")
    p.add_argument("--output", type=Path, required=True, help="folder to write")
    p.add_argument("--tp", type=int, default=1,
                   help="pad the vocabulary so that this TP size splits it (default 1)")
    p.add_argument("--force", action="store_true", help="replace an existing --output")
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    target = args.target or ("hf" if args.source == "megamod" else "megamod")
    if (args.source == "megamod") != (target == "hf"):
        p.error(f"--from {args.source} --to {target}: convert from hf/hf-parts to megamod or back")
    parts = args.source == "hf-parts"
    given_parts = args.vision is not None and args.language is not None
    if parts != given_parts or parts == (args.input is not None):
        p.error("give --input, or with --from hf-parts --vision and --language")
    if args.tp < 1:
        p.error("--tp must be >= 1")


def main(argv: list[str] | None = None) -> int:
    """`megamod convert`: 0 on success, 2 (one-line message on stderr) on bad input."""
    p = _parser()
    args = p.parse_args(argv)
    _check_args(p, args)
    from megamod.training.logging import silence_upstream_warnings

    silence_upstream_warnings()
    start = time.perf_counter()
    try:
        inputs = [args.input] if args.input is not None else [args.vision, args.language]
        check_output(args.output, inputs, args.force)
        if args.source == "hf":
            hf_to_megamod(args.input, args.output, args.tp)
        elif args.source == "hf-parts":
            hf_parts_to_megamod(args.vision, args.language, args.output, args.tp)
        else:
            megamod_to_hf(args.input, args.output)
    except MegamodError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _progress(f"done in {time.perf_counter() - start:.0f} s: {args.output}")
    return 0
