"""Inference: generation with a KV cache that p-MoD's layers prune (`cache`), the
`Generator` API and `megamod generate` (`generate`)."""
