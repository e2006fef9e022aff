"""Evaluation during training (Megatron-LM's `--eval-interval` / `--eval-iters`): the loss
on held-out shards, `eval/loss` (and `eval/loss/<i>` per source of `eval.shards` when there
are several), with the MoE routing and MoD kept ratios at evaluation (`eval/moe/...`,
`eval/mod/...`), every `eval.interval` steps and after the last one; and the scores of
`eval.tasks` (`eval/<task>/<metric>`), from a callable the command line builds (answering
benchmark questions is `megamod.eval`'s, a layer above training).

Training goes on exactly as without it: the held-out loaders are their own (the training
data position is not touched), the model returns to train mode, every random stream a
forward can draw from is restored (torch's, CUDA's and megatron-core's tracker: MoE-LLaVA's
gate draws Gumbel noise at evaluation too), and the training steps' routing and MoD
statistics are set aside while evaluating and put back after. Each evaluation reads the
same first `eval.iters` steps of every source, so its figures compare across the run.
Collective: every rank evaluates (each DP rank its share of the rows).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Iterator, Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import unwrap_model

from megamod.config import Config
from megamod.data.loader import TrainLoader, build_eval_loaders
from megamod.data.tokenizer import Tokenizer
from megamod.models.llava import LLaVA
from megamod.parallel import collective_device
from megamod.training.forward import (
    forward_step,
    next_step_agreed,
    step_totals,
    to_device,
)

# `eval.tasks`' scores (`eval/<task>/<metric>`) of the training model (unwrapped, in eval
# mode, without gradients), the run's config and tokenizer; collective over every rank.
BenchmarkEvaluator = Callable[[LLaVA, Config, Tokenizer], dict[str, float]]


class Validator:
    """The held-out loaders of `eval.shards`, the benchmarks of `eval.tasks`, and when to
    use them."""

    def __init__(self, config: Config, tokenizer: Tokenizer,
                 benchmarks: Optional[BenchmarkEvaluator] = None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.benchmarks = benchmarks
        self.loaders: list[TrainLoader] = build_eval_loaders(
            config, tokenizer, parallel_state.get_data_parallel_rank(),
            parallel_state.get_data_parallel_world_size(),
        )

    def due(self, iteration: int, last: bool) -> bool:
        interval = self.config.eval.interval
        return interval is not None and (last or iteration % interval == 0)

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """The scalars of one evaluation of `model` (megatron-core's DDP around LLaVA)."""
        llava = unwrap_model(model)
        with _training_untouched(model, llava):
            scalars = self._held_out_scalars(model, llava) if self.loaders else {}
            if self.benchmarks is not None:
                scalars.update(self.benchmarks(llava, self.config, self.tokenizer))
        return scalars

    def _held_out_scalars(self, model: torch.nn.Module, llava: LLaVA) -> dict[str, float]:
        """The held-out loss, and the routing and MoD statistics of its steps."""
        totals = [self._source_totals(model, loader) for loader in self.loaders]
        scalars = {"eval/loss": _mean(torch.stack(totals).sum(0))}
        if len(totals) > 1:
            scalars.update({f"eval/loss/{i}": _mean(t) for i, t in enumerate(totals)})
        if llava.routing_stats is not None:
            llava.routing_stats.all_reduce(parallel_state.get_tensor_and_data_parallel_group(),
                                           collective_device())
            scalars.update({f"eval/{k}": v for k, v in llava.routing_stats.scalars().items()})
        if llava.mod_stats is not None:
            llava.mod_stats.gather_pipeline_stages()
            scalars.update({f"eval/{k}": v for k, v in llava.mod_stats.scalars().items()})
        return scalars

    def _source_totals(self, model: torch.nn.Module, loader: TrainLoader) -> torch.Tensor:
        """[loss sum, loss tokens] over the source's first `eval.iters` steps, all DP ranks
        (and pipeline stages)."""
        loader.load_state_dict({**loader.state_dict(), "consumed_samples": 0})
        total = torch.zeros(2, dtype=torch.float64)
        for _ in range(self.config.eval.iters):
            micro_batches = next_step_agreed(loader)
            reports = get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iter([to_device(b) for b in micro_batches]),
                model=[model],
                num_microbatches=len(micro_batches),
                seq_length=self.config.model.language.seq_length,
                micro_batch_size=self.config.train.micro_batch_size,
                forward_only=True,
            )
            total += step_totals(reports).double().cpu()
        return total

    def close(self) -> None:
        for loader in self.loaders:
            loader.close()


def _mean(total: torch.Tensor) -> float:
    return float(total[0] / total[1].clamp(min=1))


@contextlib.contextmanager
def _training_untouched(model: torch.nn.Module, llava: Any) -> Iterator[None]:
    """Eval mode, no gradients, fresh routing statistics; afterwards train mode, the
    training statistics and every random stream as they were."""
    stats = [s for s in (llava.routing_stats, llava.mod_stats) if s is not None]
    saved_stats = [copy.deepcopy(s.__dict__) for s in stats]
    tracker = tensor_parallel.get_cuda_rng_tracker()
    saved_tracker = tracker.get_states()
    saved_cpu = torch.get_rng_state()
    saved_cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    for s in stats:
        s.reset()
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train()
        for s, saved in zip(stats, saved_stats):
            s.__dict__.update(saved)
        tracker.set_states(saved_tracker)
        torch.set_rng_state(saved_cpu)
        if saved_cuda is not None:
            torch.cuda.set_rng_state_all(saved_cuda)
