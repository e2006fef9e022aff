"""Core attention over packed rows: `SDPADotProductAttention` with `PackedSeqParams` (one
causal kernel call per sample) against the same module given the per-sample causal mask
those rows mean (one masked call per micro-batch), and against plain causal attention over
the whole row (wrong for packed rows: the floor of what a row costs). Forward + backward,
the best of `--repeats`, in one run; ratios are mask / packed.

    python benchmarks/packed_attention.py [--repeats 7] [--json]
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megamod.micro_batch import packed_seq_params
from megamod.models.core_attention import SDPADotProductAttention

HEADS, GROUPS, HEAD_DIM = 8, 4, 64  # the --quick shape's decoder (benchmarks/run.py)
# (row length, samples of each row): the --quick shape's 640 positions with one image
# sample a row (576 vision tokens + text) and with text-only samples; LLaVA-1.5's 2048.
CASES = {
    "640: one image sample a row": (640, [[620], [600]]),
    "640: text-only samples": (640, [[200, 150, 180, 100], [300, 300]]),
    "2048: three image samples a row": (2048, [[620, 630, 640], [610, 620, 615]]),
    "2048: mixed": (2048, [[700, 650, 600], [1500, 400]]),
}


def attention() -> SDPADotProductAttention:
    config = TransformerConfig(num_layers=1, hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
                               num_query_groups=GROUPS, attention_dropout=0.0, use_cpu_initialization=True)
    tp_of_one = SimpleNamespace(tp=SimpleNamespace(size=lambda: 1))
    return SDPADotProductAttention(config, 1, AttnMaskType.causal, "self", pg_collection=tp_of_one)


def best_time(step, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times[1:])  # the first warms up


def measure(row_length: int, rows: list[list[int]], repeats: int) -> dict[str, float]:
    module = attention()
    g = torch.Generator().manual_seed(0)
    b = len(rows)
    q = torch.randn(row_length, b, HEADS, HEAD_DIM, generator=g, requires_grad=True)
    k, v = (torch.randn(row_length, b, GROUPS, HEAD_DIM, generator=g, requires_grad=True) for _ in "kv")
    lengths = torch.zeros(max(map(len, rows)), b, dtype=torch.long)
    segments = torch.full((b, row_length), -1)
    for r, row in enumerate(rows):
        lengths[: len(row), r] = torch.tensor(row)
        start = 0
        for j, n in enumerate(row):
            segments[r, start : start + n] = j
            start += n
    later = torch.ones(row_length, row_length, dtype=torch.bool).triu(1)

    def packed() -> None:  # what megamod runs: the params built once a micro-batch
        module(q, k, v, None, packed_seq_params=packed_seq_params(lengths, row_length)).sum().backward()

    def masked() -> None:  # the mask built once a micro-batch, as it was
        mask = ((segments[:, :, None] != segments[:, None, :]) | later).unsqueeze(1)
        module(q, k, v, mask).sum().backward()

    def causal() -> None:
        module(q, k, v, None).sum().backward()

    times = {name: best_time(step, repeats) for name, step in
             [("packed_s", packed), ("mask_s", masked), ("plain_causal_s", causal)]}
    return times | {"ratio_mask_vs_packed": times["mask_s"] / times["packed_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = {name: measure(length, rows, args.repeats) for name, (length, rows) in CASES.items()}
    if args.json:
        print(json.dumps({"threads": torch.get_num_threads(), "cases": results}, indent=1))
        return
    for name, r in results.items():
        print(f"{name:34s} packed {r['packed_s'] * 1e3:6.1f} ms  mask {r['mask_s'] * 1e3:6.1f} ms  "
              f"plain causal {r['plain_causal_s'] * 1e3:6.1f} ms  mask/packed {r['ratio_mask_vs_packed']:.2f}")


if __name__ == "__main__":
    main()
