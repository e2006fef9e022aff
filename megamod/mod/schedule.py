"""Which decoder layers are MoD layers and what share of the vision tokens each keeps.

p-MoD's progressive ratio decay (PRD, paper section 3.3; official `shiftedcos_decay_0.85_0.15`):
`r(l) = cos(l * pi / (L - 1)) / 2 + 0.5` falls from 1 at the first layer to 0 at the last;
layer l drops tokens when `r(l) <= threshold` and keeps `max(r(l), min_ratio)` of its
vision tokens. The official code hard-codes `L - 1 = 31` (LLaVA's 32 layers); here L is the
model's number of layers, so other depths get the same curve.
"""

from __future__ import annotations

import math
from typing import Optional

from megamod.config import MoDConfig


def prd_ratio(layer: int, num_layers: int) -> float:
    """The shifted cosine r(l) of PRD (1.0 for a one-layer model)."""
    if num_layers == 1:
        return 1.0
    return math.cos(layer * math.pi / (num_layers - 1)) / 2 + 0.5


def layer_ratios(mod: MoDConfig, num_layers: int) -> list[Optional[float]]:
    """Per decoder layer: the share of vision tokens kept, or None for a plain layer."""
    if not mod.enabled:
        return [None] * num_layers
    if mod.schedule == "prd":
        ratios = []
        for layer in range(num_layers):
            r = prd_ratio(layer, num_layers)
            ratios.append(max(r, mod.prd_min_ratio) if r <= mod.prd_threshold else None)
        return ratios
    if mod.layers == "interleave":
        chosen = set(range(1, num_layers, 2))
    elif mod.layers == "deep_all":  # the official code's: from layer 2, the last excluded
        chosen = set(range(2, num_layers - 1))
    else:
        chosen = set(mod.layers)
    return [mod.ratio if layer in chosen else None for layer in range(num_layers)]
