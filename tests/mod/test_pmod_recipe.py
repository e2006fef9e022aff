"""p-MoD's recipe as a user runs it, in bf16: a dense LLaVA stage, then SFT with MoD layers
from its weights (`checkpoint.finetune`; the routers start at zero, w = 1).

The MoD stage's first loss is the loaded model's on that stage's first batch, evaluated
apart from the training loop (no jump), and its first step moves each weight by at most
the learning rate: the fp32 main copies came from the loaded weights.
"""

from __future__ import annotations

import pytest

from tests.launcher import REPO, TINY_CONFIG
from tests.stages import (
    first_loss, largest_move_beyond_lr, loaded_model_loss, plain_tensor_reader, train,
)

PMOD = REPO / "examples" / "configs" / "pmod" / "tiny.yaml"


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("pmod_recipe")
    dense = train(TINY_CONFIG, root, "dense")
    pmod = train(PMOD, root, "pmod", f"checkpoint.load={dense}", "checkpoint.finetune=true")
    return {"root": root, "dense": dense, "pmod": pmod}


@pytest.fixture(scope="module")
def weights(stages):
    yield from plain_tensor_reader()


def test_the_mod_stage_starts_where_the_dense_one_ended(stages, weights):
    reference = loaded_model_loss(PMOD, stages["root"] / "check", stages["dense"])
    # Measured 2e-8 (the log prints 6 significant digits: up to 5e-6 from rounding).
    assert first_loss(stages["root"], "pmod") == pytest.approx(reference, abs=1e-5)


def test_its_first_step_moves_each_weight_by_at_most_the_learning_rate(stages, weights):
    before, after = weights(stages["dense"], 2), weights(stages["pmod"], 1)
    routers = {k for k in after if ".mod_router." in k}
    assert routers and not routers & set(before)  # new in this stage
    after = {k: v for k, v in after.items() if k not in routers}
    assert largest_move_beyond_lr(before, after, lr=3e-3) <= 0  # tiny.yaml's lr
