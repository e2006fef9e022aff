"""The training loop: get batch -> forward/backward -> optimizer step -> log -> roll back if
the stability guard asks -> checkpoint -> stop if asked.

`train(config, preemption)` runs one job start to end on every rank, holding the
save_dir lock. Forward/backward over the micro-batches of a step is megatron-core's
schedule (`get_forward_backward_func`), which also runs `finalize_model_grads` (DP
all-reduce, SP norm grads, division by the global number of loss tokens).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import unwrap_model

from megamod.config import Config
from megamod.data.loader import TrainLoader, build_train_loader, prepare_tiny_shards
from megamod.data.tokenizer import Tokenizer, load_tokenizer
from megamod.errors import ConfigError
from megamod.models.build import build_model
from megamod.models.llava import LLaVA
from megamod.parallel import check_device_support, collective_device, dist_env_from
from megamod.training import checkpoint
from megamod.training.flops import StepFlops
from megamod.training.forward import (
    forward_step,
    next_step_agreed,
    step_totals,
    to_device,
)
from megamod.training.logging import MetricsLogger
from megamod.training.optimizer import apply_update, build_optimizer, build_scheduler, wrap_model
from megamod.training.loss_scaler import loss_scaler
from megamod.training.preemption import PreemptionWatcher
from megamod.training.stability import StabilityGuard
from megamod.training.validation import BenchmarkEvaluator, Validator

logger = logging.getLogger("megamod")


@dataclass
class TrainState:
    """What one job builds once and the loop then drives."""

    config: Config
    model: Any  # megatron-core DDP around LLaVA (`unwrap_model` gives the LLaVA)
    optimizer: Any
    scheduler: Any
    loader: TrainLoader
    guard: StabilityGuard
    validator: Optional[Validator] = None  # with eval.interval
    iteration: int = 0
    # The save_dir whose latest checkpoint this run saved or resumed from: where a
    # rollback goes (None: nowhere yet).
    last_checkpoint: Optional[str] = None


def build_loader(config: Config, tokenizer: Tokenizer) -> TrainLoader:
    data = config.data
    if "tiny" in ([m.shards for m in data.mixture] or [data.train_shards]) + config.eval.shards:
        # One build per node (a lock covers a shared home directory); every rank waits for it.
        if dist_env_from(os.environ).local_rank == 0:
            prepare_tiny_shards()
        torch.distributed.barrier()
    return build_train_loader(
        config,
        tokenizer,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
    )


def token_counts(micro_batches: list[dict]) -> tuple[int, int]:
    """(sample tokens, row positions) of this rank's micro-batches, on the host."""
    positions = sum(b["padding_mask"].numel() for b in micro_batches)
    padding = sum(int(b["padding_mask"].sum()) for b in micro_batches)
    return positions - padding, positions


def dp_metrics(
    loader: TrainLoader, step_time: float, flops: float, tokens: tuple[int, int]
) -> dict[str, float]:
    """Skipped and truncated samples, the step's model FLOPs and its tokens summed over DP
    ranks (TP/EP peers read the same samples), and the largest fraction of the step a DP
    rank waited for data (the slowest holds all up). Collective over the DP group: every
    rank calls it every step.

    `train/tokens_per_sec` counts sample tokens only, not padding (the useful throughput,
    comparable between padded, dynamically padded and packed runs);
    `data/padding_fraction` is the share of the rows' positions that held no sample;
    `data/samples_per_step` the samples the step consumed (a packed step's vary)."""
    group = parallel_state.get_data_parallel_group()
    sums = torch.tensor(
        [float(loader.counts.skipped), float(loader.counts.truncated), flops / 1e12, *map(float, tokens)],
        dtype=torch.float64, device=collective_device(),
    )
    wait = torch.tensor([loader.last_wait / step_time], device=collective_device())
    torch.distributed.all_reduce(sums, group=group)
    torch.distributed.all_reduce(wait, op=torch.distributed.ReduceOp.MAX, group=group)
    skipped, truncated, tflops, sample_tokens, positions = sums.tolist()
    return {
        "data/skipped_samples": skipped,
        "data/truncated_samples": truncated,
        "data/wait_fraction": wait.item(),
        "data/padding_fraction": 1.0 - sample_tokens / max(positions, 1.0),
        "data/samples_per_step": float(loader.last_step_samples),
        "train/tokens_per_sec": sample_tokens / step_time,
        "train/tflops_per_step": tflops,
        "train/tflops_per_sec": tflops / step_time,
    }


def mod_metrics(model: LLaVA) -> dict[str, float]:
    """MoD kept ratios and router weights over the steps since the last log (this rank's
    samples, every pipeline stage's layers), then reset. Collective over the pipeline."""
    model.mod_stats.gather_pipeline_stages()
    scalars = model.mod_stats.scalars()
    model.mod_stats.reset()
    return scalars


def moe_metrics(
    model: LLaVA, iteration: int, heatmap_interval: int
) -> tuple[dict[str, float], dict[str, Any]]:
    """MoE scalars (aux/z losses, expert load per layer and modality, dropped tokens) over
    the steps since the last log, and the expert-load heatmap when due. Collective: every
    rank calls it at every log step."""
    stats = model.routing_stats
    scalars = stats.loss_scalars(collective_device())
    stats.all_reduce(parallel_state.get_tensor_and_data_parallel_group(), collective_device())
    scalars.update(stats.scalars())
    images = {}
    if heatmap_interval and iteration % heatmap_interval == 0:
        images["moe/expert_load_heatmap"] = stats.heatmap()
    stats.reset()
    return scalars, images


def check_batch_split(config: Config, dp: int) -> None:
    """Refuse a global batch that `dp` data-parallel ranks cannot split into whole
    micro-batches (pure: `--dry-run` checks the DP size of N ranks)."""
    train = config.train
    if train.global_batch_size % (train.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} must be a multiple of "
            f"train.micro_batch_size={train.micro_batch_size} x data-parallel size {dp}"
        )


def setup(config: Config, benchmarks: Optional[BenchmarkEvaluator] = None) -> TrainState:
    """Model, optimizer, schedule and data, resumed or initialised from the checkpoint
    `checkpoint.start_from` picks (the save_dir's own, else `checkpoint.load`);
    `benchmarks` scores `eval.tasks` at each evaluation."""
    check_batch_split(config, parallel_state.get_data_parallel_world_size())
    check_device_support(config)
    tokenizer = load_tokenizer(config.data.tokenizer)
    load_dir, finetune = checkpoint.start_from(config.checkpoint)
    if load_dir is not None:
        config = checkpoint.config_for_load(load_dir, config, tokenizer.vocab_size, finetune)
    model = build_model(config, tokenizer)
    ddp_model = wrap_model(config, model)
    optimizer = build_optimizer(config, ddp_model)
    scheduler = build_scheduler(config, optimizer)
    loader = build_loader(config, tokenizer)
    guard = StabilityGuard(config.stability, loss_scaler(config, optimizer))
    validator = Validator(config, tokenizer, benchmarks) if config.eval.interval is not None else None
    state = TrainState(config, ddp_model, optimizer, scheduler, loader, guard, validator=validator)
    if load_dir is not None and finetune:
        checkpoint.load_model_weights(load_dir, model)
        # The optimizer's fp32 main copies (bf16/fp16) were taken from the initialisation:
        # refresh them from the loaded weights, as Megatron-LM does after loading, or the
        # first step would write the initialisation back.
        optimizer.reload_model_params()
        logger.info(f"loaded model weights from {load_dir} (finetune: fresh optimizer and data)")
    elif load_dir is not None:
        state.iteration, data_state = checkpoint.load_checkpoint(
            load_dir, model, optimizer, scheduler
        )
        loader.load_state_dict(data_state)
        state.last_checkpoint = load_dir
        logger.info(f"resumed from {load_dir} at iteration {state.iteration}")
    # The schedule calls these at the right moments of every step (the loss scale: fp16's,
    # 1 otherwise).
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp_model.no_sync
    model.config.grad_scale_func = optimizer.scale_loss
    return state


def forward_backward(state: TrainState, micro_batches: list[dict]) -> torch.Tensor:
    """Gradients of one step into the DDP grad buffers (already divided by the global
    loss-token count). Returns [loss sum, loss tokens] over micro-batches, DP ranks and
    pipeline stages."""
    model, config = state.model, state.config
    model.zero_grad_buffer()
    state.optimizer.zero_grad()
    reports = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([to_device(b) for b in micro_batches]),
        model=[model],
        num_microbatches=len(micro_batches),
        seq_length=config.model.language.seq_length,
        micro_batch_size=config.train.micro_batch_size,
        forward_only=False,
    )
    return step_totals(reports)


def train_step(state: TrainState, micro_batches: list[dict]) -> dict[str, float]:
    """One optimizer step over this rank's micro-batches; returns the step's metrics.

    megatron-core's `optimizer.step()` in its halves, the stability guard between them: a
    skipped step changes no parameter, optimizer state or LR (no schedule step: the next
    step retries with the same LR)."""
    iteration, guard, optimizer = state.iteration + 1, state.guard, state.optimizer
    totals = forward_backward(state, micro_batches)
    metrics = {
        "train/loss": (totals[0] / totals[1].clamp(min=1)).item(),
        "train/grad_norm": float("nan"),
        "train/lr": optimizer.param_groups[0]["lr"],  # the rate this step uses
    }
    guard.inject(iteration, state.model)
    if guard.skip_nonfinite(iteration, totals, state.model):
        return metrics
    # Copies gradients to the fp32 main params; fp16: unscales them, and grows the loss
    # scale after loss_scale_window clean steps. An overflow was the guard's to see first.
    overflow = optimizer.prepare_grads()
    assert not overflow, "overflow after the guard found every gradient finite"
    grad_norm = float(optimizer.get_grad_norm())
    metrics["train/grad_norm"] = grad_norm
    if guard.skip_spike(iteration, metrics["train/loss"], grad_norm):
        return metrics
    apply_update(optimizer, grad_norm)
    state.scheduler.step(increment=1)
    return metrics


def describe_run(state: TrainState) -> dict[str, Any]:
    """The job at a glance, logged once at the start."""
    model, config = unwrap_model(state.model), state.config
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "event": "start",
        "parameters_per_rank": params,
        "trainable_parameters_per_rank": trainable,
        "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
        "data_parallel_size": parallel_state.get_data_parallel_world_size(),
        "start_iteration": state.iteration,
        "params_dtype": config.precision.params_dtype,
        "train_iters": config.train.train_iters,
        "checkpoints": config.checkpoint.save_dir,
        "tensorboard": config.logging.tensorboard_dir,
    }


@dataclass
class TrainResult:
    losses: list[float]  # of every step this run took
    # A stop signal ended the run before train.train_iters, after saving a checkpoint.
    stopped_early: bool = False


def already_trained(config: Config) -> bool:
    """Whether the checkpoint this run would resume from has reached train.train_iters (a
    finished job resubmitted or requeued); says so."""
    load_dir, finetune = checkpoint.start_from(config.checkpoint)
    if load_dir is None or finetune:
        return False
    iteration = checkpoint.read_latest_iteration(load_dir)
    if iteration < config.train.train_iters:
        return False
    logger.info(
        f"{load_dir} is at iteration {iteration}, train.train_iters="
        f"{config.train.train_iters}: nothing to train"
    )
    return True


def save(state: TrainState) -> None:
    save_dir = state.config.checkpoint.save_dir
    path = checkpoint.save_checkpoint(
        save_dir, state.iteration, unwrap_model(state.model),
        state.optimizer, state.scheduler, state.loader.state_dict(), state.config,
    )
    state.last_checkpoint = save_dir
    if torch.distributed.get_rank() == 0:
        checkpoint.keep_tokenizer(save_dir, state.config.data.tokenizer)
    logger.info(f"saved checkpoint {path}")


def rollback(state: TrainState, metrics: MetricsLogger) -> None:
    """After too many skipped steps in a row: back to the last good checkpoint (model,
    optimizer, schedule, RNG), with the data moved past the batches that led here (PaLM's
    remedy for loss spikes). Raises TrainingUnstableError when `stability.max_rollbacks`
    are used up or there is no checkpoint; the checkpoint itself is never touched."""
    failed_at, failed_position = state.iteration, state.loader.consumed_samples
    state.guard.start_rollback(failed_at, state.last_checkpoint)
    # A fresh schedule, as a resumed run has: loading steps a schedule forward by the
    # checkpoint's step count (megatron-core's OptimizerParamScheduler.load_state_dict).
    state.scheduler = build_scheduler(state.config, state.optimizer)
    state.iteration, data_state = checkpoint.load_checkpoint(
        state.last_checkpoint, unwrap_model(state.model), state.optimizer, state.scheduler
    )
    position = state.guard.rollback_data_position(
        data_state["consumed_samples"], failed_position, state.config.train.global_batch_size
    )
    state.loader.load_state_dict({**data_state, "consumed_samples": position})
    metrics.rewind(state.iteration)
    skipped = (position - data_state["consumed_samples"]) // state.config.train.global_batch_size
    logger.warning(
        f"iteration {failed_at}: rolled back to iteration {state.iteration} "
        f"({state.last_checkpoint}), rollback {state.guard.rollbacks} of at most "
        f"{state.config.stability.max_rollbacks}; the data skips {skipped} steps' batches"
    )


def train(config: Config, preemption: PreemptionWatcher | None,
          benchmarks: Optional[BenchmarkEvaluator] = None) -> TrainResult:
    """Train to `train.train_iters`, or until `preemption` catches a stop signal: then the
    run saves a checkpoint after the current step and stops. One job owns
    `checkpoint.save_dir` meanwhile (a second one is refused). `benchmarks` (built by the
    command line from `eval.tasks`) is called at each evaluation."""
    with checkpoint.save_dir_locked(config.checkpoint.save_dir):
        if already_trained(config):
            return TrainResult(losses=[])
        return run(setup(config, benchmarks), preemption)


def run(state: TrainState, preemption: PreemptionWatcher | None) -> TrainResult:
    """The steps from `state.iteration` on: get batch -> step -> log -> checkpoint -> stop
    if asked."""
    config = state.config
    ckpt, train_cfg = config.checkpoint, config.train
    metrics = MetricsLogger(
        config.logging.tensorboard_dir, config.logging.log_interval, state.iteration
    )
    logger.info(json.dumps(describe_run(state)))
    llava = unwrap_model(state.model)
    step_flops = StepFlops(config, llava.language_model.vocab_size, llava.image_token_id)
    losses, stopped_early = [], False
    while state.iteration < train_cfg.train_iters:
        start = time.perf_counter()
        micro_batches = next_step_agreed(state.loader)
        flops, tokens = step_flops(micro_batches), token_counts(micro_batches)
        step = train_step(state, micro_batches)
        state.iteration += 1
        step_time = time.perf_counter() - start
        losses.append(step["train/loss"])
        scalars = {
            "train/loss": step["train/loss"],
            "train/lr": step["train/lr"],
            "train/grad_norm": step["train/grad_norm"],
            "train/step_time": step_time,
            **dp_metrics(state.loader, step_time, flops, tokens),
            **state.guard.scalars(),
        }
        if torch.cuda.is_available():
            scalars["train/max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        last = state.iteration == train_cfg.train_iters
        images = {}
        if llava.routing_stats is not None and metrics.is_log_step(state.iteration, last):
            moe_scalars, images = moe_metrics(
                llava, state.iteration, config.logging.moe_heatmap_interval
            )
            scalars.update(moe_scalars)
        if llava.mod_stats is not None and metrics.is_log_step(state.iteration, last):
            scalars.update(mod_metrics(llava))
        evaluated = state.validator is not None and state.validator.due(state.iteration, last)
        if evaluated:
            scalars.update(state.validator.evaluate(state.model))
        metrics.log(state.iteration, scalars, force=last or evaluated, images=images)
        if state.guard.rollback_due():
            rollback(state, metrics)
            continue
        interval = ckpt.save_interval
        saved = bool(ckpt.save_dir and (last or (interval and state.iteration % interval == 0)))
        if saved:
            save(state)
        if preemption is not None and not last and preemption.should_stop():
            if not saved:
                save(state)
            logger.info(
                f"stopped after iteration {state.iteration} on "
                f"{preemption.received or 'a signal to another rank'}: run the same "
                f"command again to continue from the checkpoint"
            )
            stopped_early = True
            break
    metrics.close()
    state.loader.close()
    if state.validator is not None:
        state.validator.close()
    return TrainResult(losses, stopped_early)
