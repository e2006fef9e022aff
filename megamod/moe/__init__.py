"""MoE-LLaVA (arXiv 2401.15947) on megatron-core's MoE: router, dispatchers and experts
are upstream's (`MoELayer`, `TopKRouter`, alltoall/allgather dispatchers, `SequentialMLP`
or `TEGroupedMLP`); this package adds what MoE-LLaVA needs beyond them: routing
statistics per modality (`stats`), dense -> MoE upcycling (`upcycle`), MoE-LLaVA's
DeepSpeed top-2 gate (`deepspeed_gate`, `moe.gate=deepspeed_top2`) and the router
subclass that runs it and feeds the statistics (`router`).

Gates. MoE-LLaVA routes with DeepSpeed 0.9.5's `top2gating`; megatron-core's TopKRouter
differs from it in four ways, each reproduced by `moe.gate=deepspeed_top2`: the second
expert is drawn with Gumbel noise on the logits (training and evaluation) instead of
being the second-highest; capacity and the tokens dropped follow DeepSpeed's token order
(first choices before second choices) over the micro-batch instead of per rank by
probability or position; a token that lost one expert gets weight 1 on the other
(renormalised after the drop) instead of keeping p / (p1 + p2); the aux loss counts first
choices only (below). Both gates take `moe.eval_capacity_factor` when the model is not
training (MoE-LLaVA: 2.0, nothing dropped with top-2 of 4).

Load-balancing loss, megatron-core vs MoE-LLaVA. MoE-LLaVA uses DeepSpeed's top-2 gate:
`l_aux = E^2 * mean_i(me_i * ce_i) = E * sum_i me_i * ce_i`, with `me_i` the mean router
probability of expert i and `ce_i` the fraction of tokens whose FIRST choice is i; the
model adds `0.01 * sum over MoE layers of l_aux` to the mean LM loss of each
micro-batch. megatron-core's `switch_load_balancing_loss_func` is
`E * sum_i P_i * f_i`, the same form with `f_i` counting all top-k choices (divided by k)
instead of the first one: both are 1 at perfect balance, but elsewhere they and their
gradients differ (upstream's gradient norm is 0.3-0.6x DeepSpeed's on random 4-expert
logits); `moe.gate=deepspeed_top2` computes DeepSpeed's (upstream's function with the
first choices as the routing map and top-1). Either is summed over MoE layers. What
differs besides is the weight against the LM loss: with per-token loss normalisation
(megamod's, as Megatron-LM's `--calculate-per-token-loss`) upstream scales each layer's
aux loss by the number of ROUTED tokens of the micro-batch before everything is divided
by the number of LOSS tokens, so its effective coefficient is `coeff x routed / loss
tokens`: 5-10x on LLaVA data where image and prompt tokens carry no loss. megamod's
router scales by the micro-batch's loss tokens instead, so `moe.aux_loss_coeff=0.01`
reproduces MoE-LLaVA's 0.01 (see `router.TopKRouterWithStats`).
"""
