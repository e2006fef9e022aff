"""MetricsLogger: interval averaging, the latest value for the rest, TensorBoard events."""

from __future__ import annotations

import json
import logging

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megamod.training.logging import MetricsLogger


def test_interval_means_and_latest_values(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, "megamod")
    monkeypatch.setattr(logging.getLogger("megamod"), "propagate", True)
    metrics = MetricsLogger(str(tmp_path), log_interval=3)
    for it, loss in enumerate([6.0, 5.0, 4.0, 3.0, 2.0], start=1):
        metrics.log(it, {"train/loss": loss, "train/lr": 0.1 * it}, force=it == 5)
    metrics.close()

    lines = [json.loads(r.getMessage()) for r in caplog.records]
    assert [(l["iteration"], l["train/loss"], l["train/lr"]) for l in lines] == [
        (3, 5.0, pytest.approx(0.3)), (5, 2.5, pytest.approx(0.5))]
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(3, 5.0), (5, 2.5)]
