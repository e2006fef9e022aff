"""The fp16 loss scale of megatron-core's optimizer, seen by the loop and the stability
guard (bf16 and fp32 need none)."""

from __future__ import annotations

from typing import Any, Optional

from megamod.config import Config


class LossScaler:
    """The fp16 loss scale of megatron-core's optimizer, for the loop and the stability guard.

    megatron-core scales the loss (the schedule calls `optimizer.scale_loss` through
    `config.grad_scale_func`), and in `prepare_grads` unscales the gradients, backs the
    scale off on an overflow and grows it after `loss_scale_window` clean steps. Each
    chained optimizer (dense and expert parameters) holds its own scaler, updated alike.
    """

    def __init__(self, optimizer: Any) -> None:
        from megatron.core.optimizer.grad_scaler import DynamicGradScaler

        optimizers = getattr(optimizer, "chained_optimizers", [optimizer])
        self.scalers = [opt.grad_scaler for opt in optimizers]
        self.dynamic = all(isinstance(s, DynamicGradScaler) for s in self.scalers)

    @property
    def value(self) -> float:
        return self.scalers[0].scale.item()

    def absorbs_overflow(self) -> bool:
        """Whether an overflowing step is what dynamic loss scaling expects (the scale can
        still come down), rather than a failure: not at the minimum, not a static scale."""
        return self.dynamic and self.scalers[0].scale.item() > self.scalers[0].min_scale.item()

    def back_off(self) -> None:
        """megatron-core's own reaction to an overflow (`DynamicGradScaler.update`): after
        `hysteresis` overflowing steps, halve the scale. The stability guard calls it when
        any rank overflowed, so every rank's scale stays the same."""
        for scaler in self.scalers:
            scaler.update(True)


def loss_scaler(config: Config, optimizer: Any) -> Optional[LossScaler]:
    """The loss scaler of an fp16 run; None otherwise (bf16 and fp32 need none)."""
    return LossScaler(optimizer) if config.precision.params_dtype == "fp16" else None
