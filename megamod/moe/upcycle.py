"""Dense -> MoE upcycling: MoE-LLaVA's step from stage 2 to stage 3, as functions of
state dicts and models (`megamod upcycle`, `megamod.cli.upcycle`, does the files).

MoE-LLaVA (arXiv 2401.15947, MoE-Tuning stage III) starts each MoE layer from the dense
LVLM of stage 2: every expert is a copy of that layer's FFN and the router (gate) is
freshly initialised; every other tensor is taken over unchanged. With identical experts
and the top-k probabilities normalised over the chosen experts (megatron-core's default,
`moe_router_pre_softmax=False`), an MoE layer computes `sum_k p_k FFN(x) = FFN(x)`: as
long as no token is dropped, stage 3 starts from exactly the stage-2 model's outputs.

megatron-core has the same step (`transformer/moe/upcycling_utils.py`, granular
upcycling, arXiv 2410.07524). At granularity 1 with softmax after top-k it also makes
plain copies, but it is not called here:
- it expands the FFN keys of EVERY layer, dense ones included (and the ViT's), so an
  alternating dense/MoE decoder (MoE-LLaVA's) gets expert keys that do not exist;
- it takes the first module named `mlp` as the MoE layer; in LLaVA that is the ViT's.
Instead each tensor of the MoE model names its dense source (`upcycle_state_dict`):
the same name, or for an expert its layer's FFN, under both expert layouts upstream
knows (`SequentialMLP`: `mlp.experts.local_experts.{e}.linear_fc1.weight`;
`TEGroupedMLP`: `mlp.experts.linear_fc1.weight{e}`), and for a MoE layer's pre-MLP norm
the dense layer's (the same name with local modules; fused into fc1 as
`mlp.linear_fc1.layer_norm_weight` with transformer-engine). Upstream keeps the routers
the MoE model was built with; here they are drawn from a generator seeded with `--seed`
(normal, std `init_method_std`, as megatron-core initialises them), so the seed alone
decides them.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch

# MoE-model key -> its dense source, for the tensors that change name.
_RENAMES = tuple((re.compile(pattern), replacement) for pattern, replacement in (
    (r"\.mlp\.experts\.local_experts\.\d+\.(linear_fc[12]\.(?:weight|bias))$", r".mlp.\1"),
    (r"\.mlp\.experts\.(linear_fc[12]\.(?:weight|bias))\d+$", r".mlp.\1"),
    (r"\.pre_mlp_layernorm\.(weight|bias)$", r".mlp.linear_fc1.layer_norm_\1"),
))


def _fresh(key: str) -> bool:
    """Tensors the MoE model keeps as built: routers, and transformer-engine's FP8 state."""
    return ".mlp.router." in key or key.endswith("_extra_state")


def _dense_source(key: str, dense_keys: Mapping[str, Any]) -> str | None:
    if key in dense_keys:
        return key
    for pattern, replacement in _RENAMES:
        source = pattern.sub(replacement, key)
        if source != key and source in dense_keys:
            return source
    return None


def upcycle_state_dict(
    dense: Mapping[str, Any], moe: Mapping[str, Any]
) -> dict[str, Any]:
    """The MoE model's tensors taken from the dense model, by MoE key: same-named tensors,
    each expert's fc1/fc2 from its layer's FFN, each MoE layer's pre-MLP norm from the
    dense layer's. Routers are left out (they start fresh). Raises if a tensor of either
    model has no counterpart: a model layout this mapping does not know."""
    result: dict[str, Any] = {}
    unused = {key for key in dense if not key.endswith("_extra_state")}
    for key, value in moe.items():
        if _fresh(key):
            continue
        source = _dense_source(key, dense)
        if source is None or dense[source].shape != value.shape:
            shape = tuple(value.shape)
            raise RuntimeError(f"upcycling found no dense tensor of shape {shape} for {key}")
        result[key] = dense[source]
        unused.discard(source)
    if unused:
        raise RuntimeError(f"upcycling left dense tensors unused: {sorted(unused)}")
    return result


def upcycle_model(dense: torch.nn.Module, moe: torch.nn.Module, seed: int) -> int:
    """Copy `dense` (a dense LLaVA) into `moe` (the same LLaVA with MoE layers) in place and
    draw the routers from `seed`. Returns the number of routers initialised."""
    moe_state = moe.state_dict()  # detached views of the parameters
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in upcycle_state_dict(dense.state_dict(), moe_state).items():
            moe_state[key].copy_(tensor)
        routers = moe.routers()
        for router in routers:
            weight = torch.empty(router.weight.shape, dtype=torch.float32)
            weight.normal_(0.0, moe.config.init_method_std, generator=generator)
            router.weight.copy_(weight)
    return len(routers)
