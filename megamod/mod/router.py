"""p-MoD's token router and TanhNorm (paper section 3.2; official `TokenRouter`,
`weight_normalization`).

The router is `Linear(hidden, 1)` with a bias, weight and bias zero-initialised (so every
token's weight starts at exactly 1 and a dense checkpoint starts MoD training without a jump
in the loss). It reads the layer input x, before the norm. TanhNorm maps its logit r to
`w = scale * tanh(r) + bias` (`tanh_0.2_1`: w in (0.8, 1.2)), bounding the weight that
multiplies the layer's output.

Departure: the logits and weights are computed in fp32 whatever the model's dtype (the
official router runs in the model's bf16); top-k over bf16 weights ties too easily. The
fp32 copy of the input that takes lives only while the logits are computed
(`Fp32Scores`): autograd would otherwise keep it, [s, b, h] in fp32, for the weight's
gradient, in every MoD layer (about 3 GB for a 7B micro-batch of 4 x 2048).
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


class Fp32Scores(torch.autograd.Function):
    """`x @ w.T + b` in fp32 for x in any dtype ([..., h] -> [...]; w [1, h], b [1]),
    keeping only x (in its own dtype, which the layer keeps anyway) for backward, which
    upcasts it again. Forward and gradients are those of upcasting x and using F.linear."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return torch.nn.functional.linear(x.float(), weight.float(), bias.float()).squeeze(-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.float()
        grad_x = (grad.unsqueeze(-1) * weight.float().squeeze(0)).to(x.dtype)
        grad_weight = torch.einsum("...,...h->h", grad, x.float()).unsqueeze(0).to(weight.dtype)
        return grad_x, grad_weight, grad.sum().reshape(1).to(weight.dtype)


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
        return Fp32Scores.apply(hidden_states, self.linear.weight, self.linear.bias)
