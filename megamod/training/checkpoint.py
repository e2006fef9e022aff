"""Checkpoints in megatron-core's dist_checkpointing format, written atomically.

Layout (Megatron-LM's): `save_dir/iter_NNNNNNN/` plus `latest_checkpointed_iteration.txt`.
Every rank writes its shards into a hidden temporary folder; only when all have
finished does rank 0 rename it to `iter_NNNNNNN` and then replace the tracker file.
A process killed mid-write leaves the temporary folder behind, never a torn
`iter_*` named as latest; the next save removes it. A save that fails to write (a full
disk) removes its own folder and says where and how much room there is; the latest
checkpoint stays as it was. Reading checks a checkpoint's files first (`check_intact`):
a damaged one (a truncated `common.pt`, a garbled tracker or `metadata.json`) is named
with the iterations of the save_dir to resume from instead.

Model and optimizer state are sharded tensors, so a checkpoint loads at another TP,
EP and DP size, and with the plain or the distributed optimizer whichever saved it.
Scheduler, data position, iteration and the run's whole config are common
state (written once): tools read the model shape from it (`saved_config`), and a run
whose MoE layout disagrees with its checkpoint is told which key to change. RNG states
are per rank and restored only when the parallel layout is unchanged.

A run starts from its own save_dir once that holds a checkpoint (`start_from`), and one
job at a time owns a save_dir (`save_dir/megamod.lock`, `SaveDirLock`). A Hugging Face
tokenizer is copied beside the checkpoints (`save_dir/tokenizer/`, `keep_tokenizer`), so
the save_dir alone rebuilds model and tokenizer (`megamod generate`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import logging
import os
import pickle
import random
import re
import shutil
import socket
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.core import CheckpointingConfig, CheckpointingException
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import (
    LocalNonpersistentObject,
    ShardedBase,
    ShardedObject,
)
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from megamod.config import CheckpointConfig, Config, build_dataclass
from megamod.errors import CheckpointError, ConfigError
from megamod.training.preemption import AbortedByCtrlC

logger = logging.getLogger("megamod")

TRACKER_FILE = "latest_checkpointed_iteration.txt"
LOCK_FILE = "megamod.lock"
TOKENIZER_DIR = "tokenizer"
# What dist_checkpointing writes into each iteration folder besides the `.distcp` shards:
# its format (serialization.py), the common (non-sharded) state, torch's shard index.
_DIST_CONFIG_FILE = "metadata.json"
_COMMON_FILE = "common.pt"
_INDEX_FILE = ".metadata"
# With expert parallelism megatron-core chains two optimizers (dense and expert params)
# and by default prefixes their state keys `chained_<i>.`, so an EP>1 checkpoint's
# optimizer state would not load at EP=1 (one optimizer). Keys without the prefix are
# the same for every layout (Megatron-LM sets this for its own dist checkpoints).
# The distributed optimizer's state is written "fully_reshardable" (distrib_optimizer.py
# `sharded_param_state_fully_reshardable`): all-gathered over DP and stored per model
# tensor under the model tensor's sharding and keys (`optimizer.state.exp_avg.<key>`, as
# the plain optimizer's), so it loads at any DP (and TP/EP) size. 0.16.1's default,
# "fully_sharded_model_space", cannot be written: its flattened ShardedTensors are
# refused ("flattened_range is not supported"); "dp_reshardable" loads only at the same
# TP/PP.
_OPTIMIZER_METADATA = {
    "chained_optim_avoid_prefix": True,
    "distrib_optim_sharding_type": "fully_reshardable",
}
# One key per decoder layer (`layers.<i>.`), never layers stacked into one tensor: dense,
# MoE and MoD layers differ in their tensors, and a dense checkpoint must load into a
# MoE or MoD model (upstream's default for new checkpoints).
_MODEL_METADATA = {"non_homogeneous_layers": True}


def model_sharded_state_dict(model: torch.nn.Module) -> dict[str, Any]:
    # A fresh dict per call: megatron-core stores the current DP group into it.
    return model.sharded_state_dict(metadata=dict(_MODEL_METADATA))
_TMP_PREFIX = ".tmp_iter_"
_ITERATION_DIR = re.compile(r"iter_(\d{7})")


def iteration_dir(save_dir: str | Path, iteration: int) -> Path:
    return Path(save_dir) / f"iter_{iteration:07d}"


def saved_iterations(save_dir: str | Path) -> list[int]:
    """The iterations `save_dir` holds an `iter_NNNNNNN` folder of, ascending."""
    found = (_ITERATION_DIR.fullmatch(p.name) for p in Path(save_dir).glob("iter_*") if p.is_dir())
    return sorted(int(m[1]) for m in found if m)


def _resume_hint(save_dir: Path, but: int | None = None) -> str:
    """How to go on from another iteration of `save_dir` than `but` (a damaged or missing
    one), or, when there is none, from scratch."""
    tracker = save_dir / TRACKER_FILE
    others = [i for i in saved_iterations(save_dir) if i != but]
    if others:
        which = "an" if but is None else "another"
        return (f"resume from {which} iteration there ({', '.join(map(str, others))}): write "
                f"its number into {tracker}")
    folder = "" if but is None else f"{iteration_dir(save_dir, but)} and "
    return f"{save_dir} holds no other iteration: delete {folder}{tracker} to start afresh"


def read_latest_iteration(load_dir: str | Path) -> int:
    load_dir = Path(load_dir)
    tracker = load_dir / TRACKER_FILE
    try:
        raw = tracker.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(
            f"no checkpoint to resume: {tracker} does not exist (checkpoint.load must be a "
            f"save_dir of an earlier run)"
        ) from None
    # ASCII digits only: str.isdigit() also passes '²', which int() refuses.
    text = raw.decode("ascii", errors="replace").strip()
    if not re.fullmatch(r"[0-9]+", text):
        held = text[:40] if raw.isascii() else raw.strip()[:40]
        raise CheckpointError(
            f"{tracker} is damaged: it should hold the number of the latest iteration but "
            f"holds {held!r}: {_resume_hint(load_dir)}"
        )
    iteration = int(text)
    if not iteration_dir(load_dir, iteration).is_dir():
        raise CheckpointError(
            f"{tracker} names iteration {iteration} but {iteration_dir(load_dir, iteration)} "
            f"is missing: {_resume_hint(load_dir, iteration)}"
        )
    return iteration


def parallel_layout() -> dict[str, int]:
    return {
        "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
        "expert_model_parallel_size": parallel_state.get_expert_model_parallel_world_size(),
        "expert_tensor_parallel_size": parallel_state.get_expert_tensor_parallel_world_size(),
        "world_size": torch.distributed.get_world_size(),
    }


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_rng(state: Any) -> ShardedObject:
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def save_checkpoint(
    save_dir: str | Path,
    iteration: int,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    data_state: dict[str, Any],
    config: Config,
) -> Path:
    """Write iteration `iteration` and make it the latest, atomically. Collective.
    `optimizer` and `scheduler` may be None (a weights-only checkpoint, as `upcycle`
    writes): `checkpoint.finetune` loads it."""
    save_dir = Path(save_dir)
    if not _all_finite(model):
        raise CheckpointError(
            f"the model has non-finite parameters at iteration {iteration}: not saved, and "
            f"the latest checkpoint in {save_dir} stays what it was"
        )
    tmp_dir = save_dir / f"{_TMP_PREFIX}{iteration:07d}"
    final_dir = iteration_dir(save_dir, iteration)
    rank = torch.distributed.get_rank()
    if rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        for stale in save_dir.glob(f"{_TMP_PREFIX}*"):  # left by a killed run
            shutil.rmtree(stale)
        tmp_dir.mkdir()
    torch.distributed.barrier()

    model_state = model_sharded_state_dict(model)
    state = {
        "model": model_state,
        "data": data_state,
        "iteration": iteration,
        "parallel": parallel_layout(),
        "config": dataclasses.asdict(config),
        "rng_state": _sharded_rng(_rng_state()),
    }
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            model_state, metadata=dict(_OPTIMIZER_METADATA)
        )
        state["scheduler"] = scheduler.state_dict()
    tracker_tmp = save_dir / f".{TRACKER_FILE}.tmp"
    with _reporting_write_failure(save_dir, iteration, (tmp_dir, tracker_tmp)):
        dist_checkpointing.save(state, str(tmp_dir))
        torch.distributed.barrier()
        if rank == 0:
            if final_dir.exists():  # re-saving an iteration after a resume
                shutil.rmtree(final_dir)
            os.replace(tmp_dir, final_dir)
            with open(tracker_tmp, "w") as f:
                f.write(f"{iteration}\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tracker_tmp, save_dir / TRACKER_FILE)
            _fsync_dir(save_dir)
    torch.distributed.barrier()
    return final_dir


# How a failed write (a full disk, a quota, an I/O error) reaches save_checkpoint: an
# OSError from Python's own writes (metadata.json, the tracker); a RuntimeError of torch's
# zip writer after a short write ("unexpected pos", "failed writing"), errno lost, from
# common.pt; the shard writer processes' failures re-raised as "Worker failure: <text>"
# and wrapped per rank in torch's CheckpointException.
_WRITE_FAILED = re.compile(r"unexpected pos|failed writing|Worker failure")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# megatron-core's shard writer logs a failed write ("Local process 0 encountered an error:
# ...") before raising it; the raised error is reported below, or propagates.
_SHARD_WRITER_LOG = "megatron.core.dist_checkpointing.strategies.filesystem_async"


def _write_failure(error: BaseException) -> BaseException | None:
    """The failed write inside `error` (its causes, a CheckpointException's per-rank
    failures), or None when `error` is something else (a bug)."""
    pending = [error]
    while pending:
        e = pending.pop()
        if isinstance(e, OSError) or (isinstance(e, RuntimeError) and _WRITE_FAILED.search(str(e))):
            return e
        failures = getattr(e, "failures", None) or {}
        pending += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        pending += [c for c in (e.__cause__, e.__context__) if c is not None]
    return None


@contextlib.contextmanager
def _reporting_write_failure(
    save_dir: Path, iteration: int, partial: tuple[Path, ...]
) -> Iterator[None]:
    """A failed write of iteration `iteration` as a CheckpointError saying where, how much
    room there is, and that the latest checkpoint is intact; rank 0 removes the `partial`
    files (this save's own) to give the room back."""
    writer_log = logging.getLogger(_SHARD_WRITER_LOG)
    level = writer_log.level
    writer_log.setLevel(logging.CRITICAL)  # its error line would only repeat ours
    try:
        yield
    except (Exception, CheckpointException) as e:  # torch's is a BaseException
        cause = _write_failure(e)
        if cause is None:
            raise
        free = shutil.disk_usage(save_dir).free
        try:
            latest: int | None = read_latest_iteration(save_dir)
        except CheckpointError:
            latest = None
        # What a checkpoint takes: the latest one, else what this one wrote before failing.
        need = sum(_bytes_under(p) for p in ([iteration_dir(save_dir, latest)] if latest is not None
                                             else partial))
        full = (getattr(cause, "errno", None) in _DISK_FULL or free < need
                or any(os.strerror(n) in str(cause) for n in _DISK_FULL))
        if torch.distributed.get_rank() == 0:
            for path in partial:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        what = "the disk is full" if full else f"{type(cause).__name__}: {str(cause).splitlines()[0]}"
        kept = ("no earlier checkpoint there" if latest is None
                else f"the latest checkpoint, {iteration_dir(save_dir, latest)}, is intact")
        raise CheckpointError(
            f"saving iteration {iteration} into checkpoint.save_dir {save_dir} failed: {what} "
            f"({free / 2**20:.1f} MiB free there; a checkpoint takes about {need / 2**20:.1f} "
            f"MiB); {kept}. Free space there, or set checkpoint.save_dir to a disk with room, "
            f"and run again"
        ) from None
    finally:
        writer_log.setLevel(level)


def _bytes_under(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _all_finite(model: torch.nn.Module) -> bool:
    """Whether every parameter on every rank is finite (a poisoned model is never saved).
    Collective."""
    device = next(model.parameters()).device
    local = torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()
    flag = local.to(device=device, dtype=torch.float32).reshape(1)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_intact(ckpt_dir: Path) -> dict[str, Any]:
    """Raise CheckpointError naming the file when `ckpt_dir` is incomplete: a file that
    dist_checkpointing writes is missing or unreadable, or a `.distcp` shard is shorter
    than its index (`.metadata`) says (an interrupted copy, a full disk). Reads only the
    small files and the shards' sizes; returns the common state (`common.pt`)."""

    def damaged(what: str) -> CheckpointError:
        return _damaged(ckpt_dir, what)

    for name in (_DIST_CONFIG_FILE, _COMMON_FILE, _INDEX_FILE):
        if not (ckpt_dir / name).is_file():
            raise damaged(f"{name} is missing")
    try:
        CheckpointingConfig(**json.loads((ckpt_dir / _DIST_CONFIG_FILE).read_text()))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise damaged(f"{_DIST_CONFIG_FILE} is not valid JSON") from None
    except TypeError:  # JSON, but not the object dist_checkpointing writes
        raise damaged(f"{_DIST_CONFIG_FILE} does not name a checkpoint format") from None
    try:
        common = dist_checkpointing.load_common_state_dict(str(ckpt_dir))
    except Exception as e:  # any unpickling failure of a truncated or garbled file
        raise damaged(f"{_COMMON_FILE} cannot be read (truncated? {type(e).__name__})") from None
    if not isinstance(common, dict):
        raise damaged(f"{_COMMON_FILE} holds a {type(common).__name__}, not a checkpoint's state")
    try:
        index = FileSystemReader(str(ckpt_dir)).read_metadata()
    except Exception as e:  # any unpickling failure of a truncated or garbled file
        raise damaged(f"{_INDEX_FILE} cannot be read ({type(e).__name__})") from None
    ends: dict[str, int] = {}
    for item in index.storage_data.values():
        ends[item.relative_path] = max(ends.get(item.relative_path, 0), item.offset + item.length)
    for name, end in sorted(ends.items()):
        shard = ckpt_dir / name
        if not shard.is_file():
            raise damaged(f"{name} is missing")
        size = shard.stat().st_size
        if size < end:
            raise damaged(f"{name} is truncated ({size} bytes, its index needs {end})")
    return common


def _damaged(ckpt_dir: Path, what: str) -> CheckpointError:
    found = _ITERATION_DIR.fullmatch(ckpt_dir.name)
    return CheckpointError(
        f"checkpoint {ckpt_dir} is damaged: {what}: copy it again from where it came from, "
        f"or {_resume_hint(ckpt_dir.parent, int(found[1]) if found else None)}"
    )


# megatron-core's messages for missing keys list every key of the checkpoint (16 KB for
# a 7B model): quoted names, comma-separated, in brackets.
_KEY_LIST = re.compile(r"\[('[^']*'(?:, '[^']*')*)\]")
_KEYS_SHOWN = 3


def _short_key_lists(text: str) -> str:
    def cut(match: re.Match) -> str:
        keys = re.findall(r"'[^']*'", match[1])
        if len(keys) <= _KEYS_SHOWN:
            return match[0]
        return f"[{', '.join(keys[:_KEYS_SHOWN])}, ... ({len(keys) - _KEYS_SHOWN} more)]"

    return _KEY_LIST.sub(cut, text)


def _load(sharded: dict[str, Any], ckpt_dir: Path) -> dict[str, Any]:
    """dist_checkpointing.load of a checked (`check_intact`) folder, with a mismatch
    reported as the user's to fix."""
    try:
        return dist_checkpointing.load(sharded, str(ckpt_dir))
    except (CheckpointingException, CheckpointException) as e:
        # torch's reader wraps each rank's failure, (exception, traceback), in `failures`.
        failures = getattr(e, "failures", None)
        cause = next(iter(failures.values()))[0] if failures else e
        if isinstance(cause, (EOFError, OSError, pickle.UnpicklingError)):
            # Unreadable bytes inside files of the right size: nothing in the model to change.
            raise CheckpointError(
                f"checkpoint {ckpt_dir} is damaged: reading it failed "
                f"({type(cause).__name__}: {cause}): copy it again, or load an earlier iteration"
            ) from None
        raise CheckpointError(
            f"checkpoint {ckpt_dir} cannot be loaded into this model: "
            f"{_short_key_lists(str(cause))}. If a model.*, moe.*, mod.* or precision.* setting "
            f"changed, use the one it was saved with (`megamod inspect {ckpt_dir.parent}` lists "
            f"them)"
        ) from None


def saved_config(load_dir: str | Path) -> Config:
    """The config the latest checkpoint of `load_dir` (a save_dir) was written with.
    Raises CheckpointError naming the fix when `load_dir` is no save_dir or its config
    cannot be read by this version of megamod."""
    load_dir = Path(load_dir)
    if load_dir.is_file():
        raise CheckpointError(
            f"{load_dir} is a file: give the checkpoint.save_dir of a training run (the "
            f"folder that holds {TRACKER_FILE} and the iter_* folders)"
        )
    if not (load_dir / TRACKER_FILE).is_file():
        missing = load_dir / TRACKER_FILE if load_dir.exists() else load_dir
        raise CheckpointError(
            f"{missing} does not exist: give the checkpoint.save_dir of a training run (the "
            f"folder that holds {TRACKER_FILE} and the iter_* folders)"
        )
    ckpt_dir = iteration_dir(load_dir, read_latest_iteration(load_dir))
    raw = check_intact(ckpt_dir).get("config")
    if raw is None:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} predates checkpoints that carry their config: this "
            f"version of megamod cannot tell its layout"
        )
    try:
        return build_dataclass(Config, raw, prefix="")
    except ConfigError as e:
        raise CheckpointError(
            f"{load_dir} was saved with a config this version of megamod cannot read: {e}"
        ) from None


def keep_tokenizer(save_dir: str | Path, name_or_path: str) -> None:
    """Copy the run's tokenizer (`data.tokenizer`, a Hugging Face folder) into
    `save_dir/tokenizer/` once, atomically; the bundled "tiny" one needs no copy. Rank 0."""
    from megamod.data.tokenizer import load_tokenizer

    target = Path(save_dir) / TOKENIZER_DIR
    if name_or_path == "tiny" or target.exists():
        return
    staging = target.with_name(f".{TOKENIZER_DIR}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    load_tokenizer(name_or_path).hf.save_pretrained(str(staging))
    os.replace(staging, target)


def tokenizer_of(save_dir: str | Path, config: Config) -> str:
    """What `load_tokenizer` takes for a save_dir's model: its copy, else the config's."""
    copy = Path(save_dir) / TOKENIZER_DIR
    return str(copy) if copy.is_dir() else config.data.tokenizer


def check_moe_layout(load_dir: str | Path, config: Config) -> None:
    """Refuse, naming the key and the fix, a config whose MoE layers do not match the
    checkpoint's (dist_checkpointing's own error names only a missing tensor)."""
    saved = saved_config(load_dir)
    num_layers = config.model.language.num_layers

    def layout(c: Config) -> dict[str, Any]:
        moe = c.moe
        return {
            "moe.num_experts": moe.num_experts,
            "moe.layer_freq": moe.layer_pattern(c.model.language.num_layers),
            "moe.ffn_hidden_size": None if moe.num_experts is None
            else moe.ffn_hidden_size or c.model.language.ffn_hidden_size,
        }

    theirs, ours = layout(saved), layout(config)
    if saved.model.language.num_layers != num_layers or theirs == ours:
        return  # another architecture altogether: the tensor-level error says more
    wrong = [k for k in ours if ours[k] != theirs[k]]
    fixes = " ".join(f"{k}={_yaml(theirs[k])}" for k in wrong)
    hint = ""
    if theirs["moe.num_experts"] is None:
        hint = " (to turn this dense checkpoint into a MoE one, run `megamod upcycle`)"
    raise CheckpointError(
        f"checkpoint {load_dir} has a different MoE layout: "
        + ", ".join(f"{k} is {_yaml(theirs[k])} there but {_yaml(ours[k])} here" for k in wrong)
        + f". Set {fixes}{hint}"
    )


def config_for_load(load_dir: str | Path, config: Config, tokenizer_size: int, finetune: bool) -> Config:
    """`config` checked against the checkpoint it starts from (on a resume, the model and
    its optimizer state's layout; the MoE layout), with the vocabulary rows the checkpoint
    was trained with (padded at that run's TP size, which may differ from this one's)
    unless the config fixes them."""
    from megamod.models.build import vocab_size, with_vocab_size

    if not finetune:
        check_resume_matches(load_dir, config)
    check_moe_layout(load_dir, config)
    if config.model.language.vocab_size is not None:
        return config
    return with_vocab_size(config, vocab_size(saved_config(load_dir), tokenizer_size))


def _resume_layout(c: Config) -> dict[str, Any]:
    """The settings a full resume must keep, by config key: they shape the model's tensors
    or the optimizer state saved for them (MoE's: `check_moe_layout`). The ViT's
    num_layers and feature_layer count only through the layers they build."""
    vision, language = c.model.vision, c.model.language
    return {
        "mod.enabled": c.mod.enabled,
        "precision.params_dtype": c.precision.params_dtype,
        **{f"model.vision.{k}": getattr(vision, k) for k in (
            "image_size", "patch_size", "hidden_size", "ffn_hidden_size", "num_attention_heads")},
        **{f"model.language.{k}": getattr(language, k) for k in (
            "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
            "normalization", "swiglu", "untie_embeddings_and_output_weights")},
        "model.language.num_query_groups":
            language.num_query_groups or language.num_attention_heads,
    }


# What `checkpoint.finetune=true` may change (it loads the weights only, cast to the
# run's dtype; MoD routers it lacks start at zero).
_FINETUNE_MAY_CHANGE = ("mod.enabled", "precision.params_dtype")


def check_resume_matches(load_dir: str | Path, config: Config) -> None:
    """Refuse, naming the config keys first, a full resume whose config changes what the
    checkpoint's tensors and optimizer state were saved for (model sizes, dtype, MoD on or
    off: dropping or adding MoD routers mid-run would also leave a checkpoint the other
    setting cannot resume). A new stage from the weights (`checkpoint.finetune=true`) may
    change the dtype and MoD."""
    saved = saved_config(load_dir)
    theirs, ours = _resume_layout(saved), _resume_layout(config)
    wrong = [k for k in ours if ours[k] != theirs[k]]
    vision, saved_vision = config.model.vision, saved.model.vision
    if vision.num_built_layers != saved_vision.num_built_layers:
        for k in ("num_layers", "feature_layer"):
            if getattr(vision, k) != getattr(saved_vision, k):
                key = f"model.vision.{k}"
                theirs[key], ours[key] = getattr(saved_vision, k), getattr(vision, k)
                wrong.append(key)
    if not wrong:
        return
    why = ""
    if "mod.enabled" in wrong:
        why = (" (resuming would " + ("drop its MoD routers" if saved.mod.enabled
                                      else "add untrained MoD routers mid-run") + ")")
    finetune = ""
    if all(k in _FINETUNE_MAY_CHANGE for k in wrong):
        finetune = ", or checkpoint.finetune=true to start a new stage from its weights"
    raise CheckpointError(
        f"checkpoint {load_dir} was trained with other settings: "
        + ", ".join(f"{k} is {_yaml(theirs[k])} there but {_yaml(ours[k])} here" for k in wrong)
        + f"{why}. Set " + " ".join(f"{k}={_yaml(theirs[k])}" for k in wrong)
        + f" to resume it{finetune}"
    )


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


def _present(model_state: dict[str, Any], ckpt_dir: Path) -> dict[str, Any]:
    """Model state without the MoD routers the checkpoint lacks (a dense checkpoint loaded
    into a MoD model: the routers keep their zero initialisation, w = 1)."""
    saved = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))
    return {
        name: value for name, value in model_state.items()
        if ".mod_router." not in name or getattr(value, "key", name) in saved
    }


def load_model_weights(load_dir: str | Path, model: torch.nn.Module) -> int:
    """Load only the model (`checkpoint.finetune`); any TP size. Returns the iteration."""
    iteration = read_latest_iteration(load_dir)
    ckpt_dir = iteration_dir(load_dir, iteration)
    check_intact(ckpt_dir)
    state = _load({"model": _present(model_sharded_state_dict(model), ckpt_dir)}, ckpt_dir)
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    assert not unexpected and all(".mod_router." in name for name in missing), (missing, unexpected)
    return iteration


def load_checkpoint(
    load_dir: str | Path, model: torch.nn.Module, optimizer: Any, scheduler: Any
) -> tuple[int, dict[str, Any]]:
    """Resume everything; returns (iteration, data state). Collective."""
    iteration = read_latest_iteration(load_dir)
    ckpt_dir = iteration_dir(load_dir, iteration)
    common = check_intact(ckpt_dir)
    if "scheduler" not in common:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} holds model weights only (no optimizer state to resume): "
            f"load it with checkpoint.finetune=true"
        )
    same_layout = common["parallel"] == parallel_layout()

    subs = _sub_optimizers(optimizer)
    for sub in subs:
        if isinstance(sub, DistributedOptimizer) and sub.optimizer is not None \
                and not sub.optimizer.state:
            # Without apex/TE (torch's AdamW) its state_dict() needs Adam's state, which a
            # fresh optimizer has not got: upstream's dummy step creates it (zero grads);
            # the load overwrites all of it, main params included.
            sub._init_optimizer_states_with_dummy_values()
    model_state = model_sharded_state_dict(model)
    request = optimizer.sharded_state_dict(
        model_state, is_loading=True, metadata=dict(_OPTIMIZER_METADATA)
    )
    saved_subs = _saved_subs(common["optimizer"], len(subs))
    cross = _saved_by_distributed(saved_subs) != isinstance(subs[0], DistributedOptimizer)
    sharded: dict[str, Any] = {"model": model_state}
    if cross:
        tensors, own = _optimizer_tensors_as_saved(request, model_state, ckpt_dir)
        sharded["optimizer_tensors"] = tensors
    else:
        sharded["optimizer"] = request
    if same_layout:
        sharded["rng_state"] = _sharded_rng(None)
    state = _load(sharded, ckpt_dir)
    model.load_state_dict(state["model"])
    if cross:
        optimizer.load_state_dict(
            _in_own_format(own, state["optimizer_tensors"], saved_subs, subs)
        )
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(common["scheduler"])
    if same_layout:
        _set_rng_state(state["rng_state"])
    return iteration, common["data"]


# Resuming across optimizers (distributed <-> plain): both store Adam's moments per model
# tensor under the same keys (`optimizer.state.exp_avg.<model key>`), so only three things
# differ and are translated: the fp32 main params' key (`optimizer.state.param.<key>`,
# distributed; `optimizer.state.fp32_param.<key>`, plain bf16/fp16; none for plain fp32,
# whose main params are the model's weights), where Adam's step count sits in the common
# state, and that state's layout.


def _sub_optimizers(optimizer: Any) -> list[Any]:
    return getattr(optimizer, "chained_optimizers", [optimizer])


def _saved_subs(saved: dict[Any, Any], count: int) -> list[dict[str, Any]]:
    """The common state of each chained optimizer (ChainedOptimizer: by index, if several)."""
    return [saved] if count == 1 else [saved[i] for i in range(count)]


def _saved_by_distributed(saved_subs: list[dict[str, Any]]) -> bool:
    return "param_state_sharding_type" in saved_subs[0]


# Where a loaded tensor goes back into an optimizer's own state dict.
_SLOT = object()


def _optimizer_tensors_as_saved(
    request: dict[Any, Any], model_state: dict[str, Any], ckpt_dir: Path
) -> tuple[dict[str, Any], dict[Any, Any]]:
    """The optimizer's sharded tensors, flat and numbered in traversal order, under the
    keys the other optimizer saved them with; and its request with `_SLOT` in their place
    (non-persistent values unwrapped). Main params that a plain fp32 optimizer saved as
    the model's weights are the model's parameters themselves (loaded first, in place)."""
    saved_keys = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))
    model_weights = {_place(t.key, t): t.data for t in nested_values(model_state)
                     if isinstance(t, ShardedBase)}
    renames = (("optimizer.state.fp32_param.", "optimizer.state.param."),
               ("optimizer.state.param.", "optimizer.state.fp32_param."))
    flat: dict[str, Any] = {}

    def saved_key(key: str) -> str:
        for own_prefix, saved_prefix in renames:
            if key.startswith(own_prefix):
                renamed = saved_prefix + key[len(own_prefix):]
                # Plain fp32 saved no main params: they were the model's weights.
                return renamed if renamed in saved_keys else key[len(own_prefix):]
        return key

    def split(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: split(v) for k, v in x.items()}
        if isinstance(x, list):
            return [split(v) for v in x]
        if isinstance(x, ShardedBase):
            key = saved_key(x.key)
            weight = model_weights.get(_place(key, x))
            if weight is not None:
                return weight
            flat[str(len(flat))] = dataclasses.replace(x, key=key)
            return _SLOT
        return x.unwrap() if isinstance(x, LocalNonpersistentObject) else x

    return flat, split(request)


def _place(key: str, sharded: ShardedBase) -> tuple:
    """What tells one model tensor's entry under `key` from another's: the experts of a MoE
    layer share one key, each at its own offset of the expert axis (a ShardedTensor) or with
    a builder of its own (a ShardedTensorFactory, e.g. a SwiGLU expert's fc1, which an
    optimizer's entry for it copies)."""
    return key, getattr(sharded, "global_offset", None), id(getattr(sharded, "build_fn", None))


def _in_own_format(
    own: dict[Any, Any], loaded: dict[str, torch.Tensor], saved_subs: list[dict[str, Any]],
    subs: list[Any],
) -> dict[Any, Any]:
    """The loaded tensors put back into this optimizer's own state dict, with the other
    optimizer's Adam step count and loss-scaler state."""
    values = iter(loaded[str(i)] for i in range(len(loaded)))

    def fill(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: fill(v) for k, v in x.items()}
        if isinstance(x, list):
            return [fill(v) for v in x]
        return next(values) if x is _SLOT else x

    state = fill(own)
    for own_sub, saved_sub, sub in zip(_saved_subs(state, len(subs)), saved_subs, subs):
        if "param_state_sharding_type" in saved_sub:
            step = saved_sub["optimizer"]["param_groups"][0]["step"]
        else:
            saved_adam = saved_sub["optimizer"] if "optimizer" in saved_sub else saved_sub
            step = saved_adam["state"]["common_step"]
        if isinstance(sub, DistributedOptimizer):
            for group in own_sub["optimizer"]["param_groups"]:
                group["step"] = float(step)
        else:
            own_adam = own_sub["optimizer"] if "optimizer" in own_sub else own_sub
            own_adam["state"]["common_step"] = torch.tensor(float(step))
        if "grad_scaler" in saved_sub:
            own_sub["grad_scaler"] = saved_sub["grad_scaler"]
    return state


def start_from(ckpt: CheckpointConfig) -> tuple[str | None, bool]:
    """The checkpoint this run starts from (None: from scratch) and whether it takes only
    the model weights (`finetune`). With `auto_resume`, the run's own save_dir wins as soon
    as it holds a checkpoint, as Megatron-LM's --load wins over --pretrained-checkpoint: a
    requeued stage-2 job continues its own run instead of restarting from stage 1."""
    if ckpt.auto_resume and ckpt.save_dir and _resumable(ckpt.save_dir):
        return ckpt.save_dir, False
    return ckpt.load, ckpt.finetune


def _resumable(save_dir: str | Path) -> bool:
    """Whether `save_dir` holds a checkpoint to resume: not none, and not a weights-only one
    (an upcycled or converted model written there, which `checkpoint.load` + `finetune`
    start from). A latest checkpoint that cannot be read counts as resumable, so that the
    resume reports what is wrong with it."""
    if not (Path(save_dir) / TRACKER_FILE).is_file():
        return False
    try:
        ckpt_dir = iteration_dir(save_dir, read_latest_iteration(save_dir))
        common = dist_checkpointing.load_common_state_dict(str(ckpt_dir))
    except Exception:  # damaged or missing: the load names it
        return True
    return "scheduler" in common


class SaveDirInUse(CheckpointError):
    """Another job holds the save_dir's lock; `holder` says who (job id, pid, host, since)."""

    def __init__(self, message: str, holder: str) -> None:
        super().__init__(message)
        self.holder = holder


class SaveDirLock:
    """One job writes a save_dir at a time: an exclusive `flock` on `save_dir/megamod.lock`.

    The kernel drops an flock when its holder dies, however it dies (kill -9; a lost node's
    NFS lease or Lustre lock expires), so a dead job's lock is free for the next one with no
    staleness guess. The file's content (job id, host, pid) only tells a refused job who
    holds it; a holder that died leaves it behind, to be overwritten by the next."""

    def __init__(self, save_dir: str | Path) -> None:
        self.path = Path(save_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise SaveDirInUse naming its holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 4096, 0).decode(errors="replace").strip())
            os.close(fd)
            raise SaveDirInUse(
                f"checkpoint.save_dir {self.path.parent} is in use by {holder} "
                f"(lock {self.path}): wait for that job to end, or set another "
                f"checkpoint.save_dir", holder
            ) from None
        except OSError as e:  # a file system without flock (Lustre mounted noflock)
            os.close(fd)
            logger.warning(f"cannot lock {self.path} ({e}): running without the save_dir lock")
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode() + b"\n", 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # no holder to name any more
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def lock_holder(save_dir: str | Path) -> str | None:
    """Who holds `save_dir`'s lock (a job training into it), or None if no one does."""
    path = Path(save_dir) / LOCK_FILE
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # refused while a job holds it
    except BlockingIOError:
        return _describe(os.pread(fd, 4096, 0).decode(errors="replace").strip())
    except OSError:  # a file system without flock: no job can hold it either
        return None
    finally:
        os.close(fd)  # drops the shared lock taken, if any
    return None


def _holder() -> dict[str, Any]:
    return {
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def _describe(holder_json: str) -> str:
    try:
        h = json.loads(holder_json)
    except json.JSONDecodeError:
        return "another process"  # caught between its truncate and write
    job = f"Slurm job {h['slurm_job_id']}, " if h.get("slurm_job_id") else ""
    return f"{job}pid {h['pid']} on {h['host']} since {h['since']}"


@contextlib.contextmanager
def save_dir_locked(save_dir: str | Path | None) -> Iterator[None]:
    """Rank 0 holds the save_dir lock for the job inside the block; every rank raises
    CheckpointError if another job holds it. Collective."""
    if save_dir is None:
        yield
        return
    lock, error = SaveDirLock(save_dir), [None]
    if torch.distributed.get_rank() == 0:
        try:
            lock.acquire()
        except CheckpointError as e:
            error[0] = str(e)
    torch.distributed.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise CheckpointError(error[0])
    try:
        yield
    except AbortedByCtrlC as e:  # its message names the checkpoint the run resumes from
        with contextlib.suppress(CheckpointError):
            e.last_checkpoint = iteration_dir(save_dir, read_latest_iteration(save_dir))
        raise
    finally:
        lock.release()
