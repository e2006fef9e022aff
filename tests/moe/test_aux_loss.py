"""The load-balancing loss reaches the router's gradient with MoE-LLaVA's weight.

In a world of one, the router gradients of megamod's step (megatron-core's aux loss via
our router, schedule, finalize_model_grads) are compared with plain autograd of an
independent implementation of the objective over the same two micro-batches:

    (sum_mb LM_sum_mb + coeff * sum_mb L_mb * sum_layers aux_l,mb) / sum_mb L_mb

with L_mb the micro-batch's loss tokens and aux = E * sum_i f_i * P_i (f_i: share of the
top-k choices going to expert i, P_i: mean router probability), i.e. per micro-batch
`mean LM loss + coeff * sum of layer aux losses`, MoE-LLaVA's objective.
"""

from __future__ import annotations

import pytest
import torch

from megamod.config import load_config
from tests.launcher import TINY_CONFIG, world_of_one

BASE = ["moe.num_experts=4", "moe.router_topk=2", "moe.layer_freq=2", "moe.z_loss_coeff=0",
        "checkpoint.save_dir=null", "checkpoint.save_interval=null",
        "logging.tensorboard_dir=null", "train.global_batch_size=4", "train.micro_batch_size=2"]


@pytest.fixture(scope="module")
def world():
    with world_of_one(BASE):
        yield


def megamod_router_grads(coeff: float):
    """Router gradients of one megamod step (the model is rebuilt from the same seed)."""
    from megatron.core.utils import unwrap_model

    from megamod.parallel import seed_everything
    from megamod.training.loop import forward_backward, setup

    config = load_config(TINY_CONFIG, BASE + [f"moe.aux_loss_coeff={coeff}"])
    seed_everything(config.train.seed)
    torch.manual_seed(config.train.seed)
    state = setup(config)
    model = unwrap_model(state.model)
    batches = state.loader.next_step()
    forward_backward(state, batches)
    grads = [r.weight.main_grad.clone() for r in model.routers()]
    return grads, model, batches


def reference_router_grads(model, batches, coeff: float) -> list[torch.Tensor]:
    """Autograd of the objective above, megatron-core's own aux loss switched off."""
    routers = model.routers()
    logits = []
    for router in routers:
        router.config.moe_aux_loss_coeff = 0.0  # shared TransformerConfig: all routers
        gating = router.gating
        router.gating = lambda x, gating=gating: logits.append(gating(x)) or logits[-1]
    lm_sum, aux_sum, loss_tokens = 0.0, 0.0, 0.0
    for batch in batches:
        logits.clear()
        per_token = model(batch["tokens"], batch["images"], batch["labels"], batch["loss_mask"],
                          padding_mask=batch["padding_mask"])
        mask = batch["loss_mask"].float()
        lm_sum = lm_sum + (per_token * mask).sum()
        real = ~batch["padding_mask"].t().reshape(-1)  # the routers' order: [s, b]
        aux = 0.0
        for layer_logits in logits:  # over the real tokens: padding is routed nowhere
            scores = layer_logits.view(-1, 4)[real].softmax(-1)  # [tokens, experts]
            chosen = torch.zeros_like(scores).scatter(1, scores.topk(2, dim=1).indices, 1.0)
            f = chosen.sum(0) / chosen.sum()
            aux = aux + 4 * (f * scores.mean(0)).sum()
        aux_sum = aux_sum + coeff * mask.sum() * aux
        loss_tokens += mask.sum()
    total = (lm_sum + aux_sum) / loss_tokens
    return list(torch.autograd.grad(total, [r.weight for r in routers]))


@pytest.mark.parametrize("coeff", [0.0, 0.5])
def test_router_gradient_is_lm_plus_weighted_aux(world, coeff):
    grads, model, batches = megamod_router_grads(coeff)
    assert len(grads) == 2 and all(g.abs().sum() > 0 for g in grads)
    reference = reference_router_grads(model, batches, coeff)
    for grad, ref in zip(grads, reference):
        torch.testing.assert_close(grad, ref, atol=1e-6, rtol=1e-4)


def test_a_large_coefficient_changes_the_router_gradient(world):
    with_aux, model, batches = megamod_router_grads(1.0)
    lm_only = reference_router_grads(model, batches, 0.0)  # the same weights and batches
    for g1, g0 in zip(with_aux, lm_only):
        assert (g1 - g0).abs().max() > 0.1 * g0.abs().max()
