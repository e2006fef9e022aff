"""Generation timed for `benchmarks/run.py`: prefill and per-token decode time and KV-cache
bytes of each model, at batch 1 and 8, on the benchmark's own samples.

Prefill is `generate(max_new_tokens=1)` (the prompt's forward and one token picked);
decode per token is `(generate(1 + n) - generate(1)) / n`, every sample running all n
steps. Models are timed interleaved, median of the repetitions, as the training steps are.
"""

from __future__ import annotations

import statistics
import time
import torch

from megamod.inference.generate import Generator

BATCH_SIZES = (1, 8)


def prompts_of(generator: Generator, micro_batches: list[dict],
               batch: int) -> tuple[list[list[int]], torch.Tensor]:
    """`batch` prompts (the benchmark's samples without their padding, cycled) and their
    images, in order."""
    samples = []
    for micro_batch in micro_batches:
        prompts = [row.tolist() for row in micro_batch["tokens"]]
        for tokens in prompts:
            while tokens and tokens[-1] == generator.tokenizer.pad_id:
                tokens.pop()
        samples += zip(prompts, generator.images_per_prompt(prompts, micro_batch["images"]))
    chosen = [samples[i % len(samples)] for i in range(batch)]
    return [tokens for tokens, _ in chosen], torch.cat([images for _, images in chosen])


def _timed(generator: Generator, prompts: list[list[int]], images: torch.Tensor,
           max_new_tokens: int) -> tuple[float, int]:
    """Seconds of one generation, and its KV-cache bytes."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = generator.generate(prompts, images, max_new_tokens, stop_at_eos=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, result.cache_bytes


def measure_generation(
    generators: dict[str, Generator],
    micro_batches: list[dict],
    new_tokens: int = 8,
    repeats: int = 3,
) -> dict[str, dict[str, float]]:
    """Per model and batch size (`<name>/b<batch>`): prefill_s, decode_token_s,
    kv_cache_bytes (as allocated for the prompt and the new tokens)."""
    results: dict[str, dict[str, float]] = {}
    for batch in BATCH_SIZES:
        prompts, images = prompts_of(next(iter(generators.values())), micro_batches, batch)
        times = {name: {"prefill": [], "full": []} for name in generators}
        cache_bytes = {}
        for repeat in range(repeats + 1):  # the first round warms up
            for name, generator in generators.items():
                prefill, _ = _timed(generator, prompts, images, 1)
                full, cache_bytes[name] = _timed(generator, prompts, images, 1 + new_tokens)
                if repeat:
                    times[name]["prefill"].append(prefill)
                    times[name]["full"].append(full)
        for name, measured in times.items():
            prefill = statistics.median(measured["prefill"])
            full = statistics.median(measured["full"])
            results[f"{name}/b{batch}"] = {
                "prefill_s": prefill,
                "decode_token_s": max(full - prefill, 0.0) / new_tokens,
                "kv_cache_bytes": cache_bytes[name],
            }
    return results


def generation_ratios(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """MoD against dense at each batch size, and the issue's keys (at batch 8)."""
    ratios = {}
    for batch in BATCH_SIZES:
        mod, dense = results.get(f"mod/b{batch}"), results.get(f"dense/b{batch}")
        if mod is None or dense is None:
            continue
        ratios[f"ratio_mod_vs_dense_prefill_b{batch}"] = mod["prefill_s"] / dense["prefill_s"]
        ratios[f"ratio_mod_vs_dense_decode_b{batch}"] = mod["decode_token_s"] / dense["decode_token_s"]
        ratios[f"kv_cache_ratio_measured_b{batch}"] = mod["kv_cache_bytes"] / dense["kv_cache_bytes"]
    last = BATCH_SIZES[-1]
    if f"ratio_mod_vs_dense_prefill_b{last}" in ratios:
        ratios["ratio_mod_vs_dense_prefill"] = ratios[f"ratio_mod_vs_dense_prefill_b{last}"]
        ratios["ratio_mod_vs_dense_decode"] = ratios[f"ratio_mod_vs_dense_decode_b{last}"]
    return ratios
