"""p-MoD's token router and TanhNorm (paper section 3.2; official `TokenRouter`,
`weight_normalization`).

The router is `Linear(hidden, 1)` with a bias, weight and bias zero-initialised (so every
token's weight starts at exactly 1 and a dense checkpoint starts MoD training without a jump
in the loss). It reads the layer input x, before the norm. TanhNorm maps its logit r to
`w = scale * tanh(r) + bias` (`tanh_0.2_1`: w in (0.8, 1.2)), bounding the weight that
multiplies the layer's output.

Departure: the logits and weights are computed in fp32 whatever the model's dtype (the
official router runs in the model's bf16); top-k over bf16 weights ties too easily.
"""

from __future__ import annotations

import torch

_NORMS = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "none": lambda r: r}


class WeightNorm:
    """`<f>_<scale>_<bias>` (e.g. `tanh_0.2_1`) as a function of the router logits."""

    def __init__(self, spec: str) -> None:
        name, scale, bias = spec.split("_")
        self.function, self.scale, self.bias = _NORMS[name], float(scale), float(bias)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return self.scale * self.function(logits) + self.bias


class TokenRouter(torch.nn.Module):
    """One logit per token: [s, b, h] -> [s, b], in fp32."""

    def __init__(self, hidden_size: int, sequence_parallel: bool) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1, bias=True)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)
        for param in self.parameters():
            # Under sequence parallelism each TP rank computes the gradient of the weights
            # it used; finalize_model_grads sums params flagged so over the TP group.
            param.sequence_parallel = sequence_parallel

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight, bias = self.linear.weight.float(), self.linear.bias.float()
        return torch.nn.functional.linear(hidden_states.float(), weight, bias).squeeze(-1)
