"""MoE-LLaVA (arXiv 2401.15947) on megatron-core's MoE: router, dispatchers and experts
are upstream's (`MoELayer`, `TopKRouter`, alltoall/allgather dispatchers, `SequentialMLP`
or `TEGroupedMLP`); this package adds what MoE-LLaVA needs beyond them: routing
statistics per modality (`stats`), dense -> MoE upcycling (`upcycle`) and the router
subclass that feeds both (`router`).

Load-balancing loss, megatron-core vs MoE-LLaVA. MoE-LLaVA uses DeepSpeed's top-2 gate:
`l_aux = E^2 * mean_i(me_i * ce_i) = E * sum_i me_i * ce_i`, with `me_i` the mean router
probability of expert i and `ce_i` the fraction of tokens whose FIRST choice is i; the
model adds `0.01 * sum over MoE layers of l_aux` to the mean LM loss of each
micro-batch. megatron-core's `switch_load_balancing_loss_func` is
`E * sum_i P_i * f_i`, the same form with `f_i` counting all top-k choices (divided by k)
instead of the first one: both are 1 at perfect balance and equal whenever the first and
second choices are balanced alike. It is also summed over MoE layers. What differs is the
weight against the LM loss: with per-token loss normalisation (megamod's, as Megatron-LM's
`--calculate-per-token-loss`) upstream scales each layer's aux loss by the number of
ROUTED tokens of the micro-batch before everything is divided by the number of LOSS
tokens, so its effective coefficient is `coeff x routed / loss tokens`: 5-10x on LLaVA data
where image and prompt tokens carry no loss. megamod's router scales by the
micro-batch's loss tokens instead, so `moe.aux_loss_coeff=0.01` reproduces MoE-LLaVA's
0.01 (see `router.TopKRouterWithStats`).
"""
