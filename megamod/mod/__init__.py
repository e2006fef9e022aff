"""p-MoD (arXiv 2412.04449): Mixture-of-Depths decoder layers that run only the most useful
vision tokens. `schedule` decides which layers drop tokens and how many (PRD), `router`
scores the tokens (TanhNorm), `layer` is the MoD layer (STRing outputs, exact under
sequence parallelism)."""
