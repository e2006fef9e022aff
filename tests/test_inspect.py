"""`megamod inspect` through the CLI, on checkpoints of real tiny training runs.

Two runs: a MoE one (4 experts on layers 0 and 2, TP=1) and a dense one at TP=2 + SP.
What the inspector reports is checked against counts made here, independently: the
same models built in this process (parameters per part by `numel`), the same batches
read by the same loader (image tokens by the `<image>` token id), and the MoE
checkpoint's routing recomputed from those batches (each router's input x weight,
softmax, top-2, counted per modality).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.launcher import REPO, TINY_CONFIG, check, free_port, megamod_train, run

MOE = ["moe.num_experts=4", "moe.layer_freq=2"]
NO_OUTPUTS = ["checkpoint.save_interval=null", "logging.tensorboard_dir=null"]
BATCHES = 2


def train(root: Path, nproc: int, overrides: list[str]) -> Path:
    megamod_train(nproc, overrides + NO_OUTPUTS + [f"checkpoint.save_dir={root}/ckpt"], cwd=root)
    return root / "ckpt"


def inspect(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "megamod", "inspect", *map(str, args)], cwd=cwd,
               extra_env={"MASTER_PORT": str(free_port())})


def inspect_here(capsys, *args: object) -> subprocess.CompletedProcess:
    """`megamod inspect ARGS` in this process (its checks before a routing analysis need no
    process group; the command's own process is tested by the routing reports)."""
    from megamod.__main__ import main

    code = main(["inspect", *map(str, args)])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["megamod", "inspect", *map(str, args)], code, out, err)


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("moe"), 1, MOE + ["train.train_iters=2"])


@pytest.fixture(scope="module")
def dense_ckpt(tiny_tp2_sp_checkpoint) -> Path:
    return tiny_tp2_sp_checkpoint  # trained at TP=2 + SP (tests/conftest.py)


@pytest.fixture(scope="module")
def report(moe_ckpt) -> dict:
    """`inspect --routing --json` of the MoE checkpoint: summary plus routing."""
    result = check(inspect(moe_ckpt, "--routing", "--data", "tiny", "--batches", BATCHES, "--json",
                           cwd=moe_ckpt.parent))
    return json.loads(result.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def reference(moe_ckpt) -> dict:
    """Counted here as a world of one: parameters per part of both models, the tokens of
    the first BATCHES global batches of tiny, and where the MoE checkpoint's routers send
    them (`count_routing`)."""
    from megamod.config import load_config
    from megamod.data.loader import build_train_loader
    from megamod.data.tokenizer import load_tokenizer
    from megamod.parallel import destroy_distributed, init_distributed
    from megamod.models.build import build_model
    from megamod.training.checkpoint import load_model_weights

    moe_config = load_config(TINY_CONFIG, MOE)
    # TP=2 pads the vocabulary to a multiple of 64 x 2; at TP=1 the same model needs 128.
    dense_config = load_config(TINY_CONFIG, ["model.language.make_vocab_size_divisible_by=128"])
    tokenizer = load_tokenizer(moe_config.data.tokenizer)
    with build_train_loader(moe_config, tokenizer, dp_rank=0, dp_size=1) as loader:
        batches = [b for _ in range(BATCHES) for b in loader.next_step()]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MASTER_PORT", str(free_port()))
        init_distributed(moe_config.parallel, moe_config.train.seed)
        try:
            moe_model = build_model(moe_config, tokenizer)
            params = {"moe": part_sizes(moe_model),
                      "dense": part_sizes(build_model(dense_config, tokenizer))}
            load_model_weights(moe_ckpt, moe_model)
            slots = count_routing(moe_model, batches, tokenizer.image_token_id)
        finally:
            destroy_distributed()
    image = sum(int((b["tokens"] == tokenizer.image_token_id).sum()) for b in batches)
    return {
        "params": params,
        "tokens": sum(int((~b["padding_mask"]).sum()) for b in batches),  # padding routes nowhere
        "image_tokens": image,
        "images": sum(b["images"].shape[0] for b in batches),
        "patches": moe_config.model.vision.num_patches,
        "slots": slots,
    }


def count_routing(model, batches: list[dict], image_id: int) -> dict[int, np.ndarray]:
    """Per MoE layer, [2, experts]: the top-2 choices of its router for the text and the
    image tokens of `batches`, recomputed from what each router receives (forward
    pre-hooks, the model in eval mode as the inspector runs it): softmax(x W^T), float64."""
    import torch
    from megatron.core.transformer.moe.router import TopKRouter

    routers = {int(re.search(r"layers\.(\d+)\.", name).group(1)): module
               for name, module in model.named_modules() if isinstance(module, TopKRouter)}
    seen: list[tuple[int, torch.Tensor]] = []
    hooks = [router.register_forward_pre_hook(
        lambda module, args, layer=layer: seen.append((layer, args[0].detach())))
        for layer, router in routers.items()]
    slots = {layer: np.zeros((2, router.weight.shape[0])) for layer, router in routers.items()}
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                seen.clear()
                model(batch["tokens"], batch["images"], padding_mask=batch["padding_mask"])
                assert sorted(layer for layer, _ in seen) == sorted(routers)
                real = ~batch["padding_mask"].t().reshape(-1)  # router order [s, b]
                is_image = (batch["tokens"].t() == image_id).reshape(-1)[real]
                for layer, x in seen:
                    x = x.double().reshape(-1, x.shape[-1])[real]
                    logits = x @ routers[layer].weight.double().t()
                    chosen = torch.softmax(logits, -1).topk(2, dim=-1).indices
                    picked = torch.zeros_like(logits).scatter_(1, chosen, 1.0)
                    for modality, rows in enumerate((~is_image, is_image)):
                        slots[layer][modality] += picked[rows].sum(0).numpy()
    finally:
        for hook in hooks:
            hook.remove()
    return slots


def part_sizes(model) -> dict[str, int]:
    def numel(modules) -> int:
        return sum(p.numel() for p in modules.parameters())

    parts = model.parts()
    experts = sum(numel(layer.experts) for layer in parts["moe"])
    return {"vision": numel(parts["vision"]), "projector": numel(parts["projector"]),
            "language": numel(parts["language"]) - experts, "experts": experts,
            "total": numel(model)}


def test_moe_summary(report, reference):
    assert report["iteration"] == 2 and report["resumable"]
    assert report["parallel"] == {
        "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
        "expert_model_parallel_size": 1, "expert_tensor_parallel_size": 1, "world_size": 1,
    }
    assert report["model"]["language"]["num_layers"] == 4
    assert report["moe"] == {"num_experts": 4, "router_topk": 2, "moe_layers": [0, 2],
                             "capacity_factor": None}
    expected = reference["params"]["moe"]
    params = report["parameters"]
    assert {k: params[k] for k in expected} == expected
    assert expected["experts"] > 0 and expected["total"] == sum(
        expected[k] for k in ("vision", "projector", "language", "experts"))
    # Each token passes through 2 of the 4 experts of a MoE layer.
    assert params["activated"] == expected["total"] - expected["experts"] // 2
    tensors = report["tensors"]
    assert sum(math.prod(t["shape"]) for t in tensors.values()) == expected["total"]
    assert {t["dtype"] for t in tensors.values()} == {"float32"}
    experts = tensors["language_model.decoder.layers.0.mlp.experts.experts.linear_fc1.weight"]
    assert experts["shape"] == [4, 2 * 352, 128]  # 4 experts x SwiGLU's gate + up rows


def test_routing(report, reference):
    routing = report["routing"]
    assert routing["moe_layers"] == [0, 2] and routing["batches"] == BATCHES
    image, text = reference["image_tokens"], reference["tokens"] - reference["image_tokens"]
    assert image == reference["images"] * reference["patches"] > 0
    # Every MoE layer routes every token of the batches (TP=1, no sequence split).
    assert routing["tokens"] == {"text": [text, text], "image": [image, image]}
    assert routing["dropped_fraction"] == pytest.approx([0.0, 0.0], abs=1e-12)  # dropless
    # The shares against the routing recomputed here from the same checkpoint and batches.
    for row, layer in enumerate(routing["moe_layers"]):
        slots = reference["slots"][layer]
        assert slots.sum() == 2 * (text + image)  # every token chose 2 experts
        for modality, counted in (("all", slots.sum(0)), ("text", slots[0]), ("image", slots[1])):
            # float64 quotients of integer counts on both sides, equal when the counts are
            # (2 batches x 8 x 128 tokens x 2 slots: one slot moved shifts a share by
            # 1 / 4096 or more).
            assert routing["load"][modality][row] == pytest.approx(
                counted / counted.sum(), rel=1e-12, abs=0), (modality, layer)
    # Not vacuous: the trained routers are unbalanced, unlike a uniform 0.25 each.
    assert max(abs(share - 0.25) for load in routing["load"].values() for row in load
               for share in row) > 0.01


def test_routing_table_prints_every_share(report):
    from megamod.cli.inspect import format_routing

    routing = report["routing"]
    blocks = format_routing(routing).split("\n\n")[1:]
    assert [b.splitlines()[0] for b in blocks] == ["all tokens", "text tokens", "image tokens"]
    for block, modality in zip(blocks, ("all", "text", "image")):
        header, *rows = block.splitlines()[1:]
        assert header.split()[:6] == ["layer", "tokens", "e0", "e1", "e2", "e3"]
        for row, layer, shares in zip(rows, routing["moe_layers"], routing["load"][modality]):
            cells = row.split()
            assert int(cells[0]) == layer
            assert [float(c) for c in cells[2:6]] == pytest.approx(shares, abs=5e-4)


def test_dense_summary_at_tp2(dense_ckpt, reference, capsys):
    result = check(inspect_here(capsys, dense_ckpt))
    out = result.stdout
    assert f"{dense_ckpt}, iteration 2" in out
    assert "tensor_model_parallel_size=2" in out and "world_size=2" in out
    assert re.search(r"^moe\s+none \(dense\)$", out, re.M)
    expected = reference["params"]["dense"]
    assert expected["experts"] == 0
    for part in ("vision", "projector", "language", "total"):
        assert re.search(rf"^\s+{part}\s+{expected[part]:,}\b", out, re.M), (part, out)
    assert "activated" not in out


def test_routing_on_a_dense_checkpoint_exits_2(dense_ckpt, capsys):
    result = inspect_here(capsys, dense_ckpt, "--routing", "--data", "tiny")
    assert result.returncode == 2, result.stderr
    assert f"{dense_ckpt} has no MoE layers" in result.stderr and "upcycle" in result.stderr


def test_missing_checkpoint_exits_2_naming_it(tmp_path, capsys):
    missing = tmp_path / "no_such_run"
    result = inspect_here(capsys, missing)
    assert result.returncode == 2 and f"{missing} does not exist" in result.stderr


def test_flops_of_the_pmod_config_against_the_schedule_by_hand(tmp_path):
    """LLaVA-1.5-7B with p-MoD's PRD: with no text tokens the KV cache holds, per layer,
    the vision tokens it keeps: 576 in layers 0-7, trunc(576 x max(r, 0.15)) after."""
    import math

    config = REPO / "examples" / "configs" / "pmod" / "llava15_7b.yaml"
    # Vicuna's 32,000 tokens + <image>, padded: the tokenizer folder is not needed then.
    result = check(run([sys.executable, "-m", "megamod", "inspect", str(config), "--flops",
                        "--text-tokens", "0", "--json", "model.language.vocab_size=32128"],
                       cwd=tmp_path))
    report = json.loads(result.stdout.strip().splitlines()[-1])
    kept = []
    for layer in range(32):
        r = math.cos(layer * math.pi / 31) / 2 + 0.5
        kept.append(576 if r > 0.85 else int(576 * max(r, 0.15)))
    assert kept[7] == 576 and kept[8] < 576 and kept[-1] == 86  # 576 x 0.15 -> 86
    assert report["kv_cache_ratio"] == pytest.approx(sum(kept) / (32 * 576), abs=1e-3)
    assert report["kv_cache_bytes_dense"] == 32 * 576 * 2 * 4096 * 2  # K and V, bf16
    assert 0.4 < report["flops_ratio"] < report["kv_cache_ratio"] + 0.1


def test_a_config_file_is_told_to_use_flops(capsys):
    from megamod.cli.inspect import main

    assert main([str(TINY_CONFIG)]) == 2
    err = capsys.readouterr().err
    assert f"{TINY_CONFIG} is a file, not a checkpoint" in err and "--flops" in err
    assert "latest_checkpointed_iteration.txt" not in err


def test_routing_of_a_bf16_checkpoint(tmp_path):
    """bf16 training casts the whole model and its inputs (megatron-core's Float16Module):
    the routing analysis runs it the same way, where it used to fail on a dtype mismatch."""
    from megamod.data.tokenizer import load_tokenizer
    from megamod.models.build import build_model
    from megamod.training.checkpoint import save_checkpoint
    from tests.launcher import world_of_one

    with world_of_one(MOE + ["precision.params_dtype=bf16"]) as config:
        model = build_model(config, load_tokenizer(config.data.tokenizer)).bfloat16()
        save_checkpoint(tmp_path / "ckpt", 1, model, None, None, {}, config)
    result = check(inspect(tmp_path / "ckpt", "--routing", "--data", "tiny", "--batches", 1,
                           "--json", cwd=tmp_path))
    report = json.loads(result.stdout.splitlines()[-1])
    assert {t["dtype"] for t in report["tensors"].values()} == {"bfloat16"}
    routing = report["routing"]
    assert routing["moe_layers"] == [0, 2]
    tokens = [text + image for text, image in zip(routing["tokens"]["text"], routing["tokens"]["image"])]
    assert tokens[0] == tokens[1] > 0  # every token reaches both MoE layers
    for row in routing["load"]["all"]:
        assert sum(row) == pytest.approx(1.0) and all(share >= 0 for share in row)
