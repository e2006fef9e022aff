"""`megamod upcycle` (MoE-LLaVA stage 2 -> 3) against the dense model it starts from.

One tiny dense checkpoint (2 processes, TP=2 + SP: tests/conftest.py's, shared) is upcycled once
through the CLI (`--layer-freq 2`, replacing a non-empty output with `--force`). The
checks run in this process as a world of one (TP=1), with models built and loaded as
`megamod train` builds and loads them, plus one 2-process stage-3 start at EP=2. Expected key names are written out
here, not taken from the code under test.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from megamod.config import load_config
from megamod.data.tokenizer import load_tokenizer
from tests.launcher import TINY_CONFIG, check, megamod_train, run, world_of_one

QUIET = ["checkpoint.save_dir=null", "checkpoint.save_interval=null",
         "logging.tensorboard_dir=null"]
MOE = ["moe.num_experts=4", "moe.layer_freq=2"]  # dropless: moe.capacity_factor is null
SEED = 7
LAYER = "language_model.decoder.layers.{}."


def upcycle_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "megamod", "upcycle", *args]


@pytest.fixture(scope="module")
def dense_ckpt(tiny_tp2_sp_checkpoint):
    """Trained at TP=2 + SP (tests/conftest.py): upcycling takes a checkpoint of any TP (the
    checks build the dense reference at TP=1 from it)."""
    return tiny_tp2_sp_checkpoint


@pytest.fixture(scope="module")
def upcycled(dense_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("moe") / "ckpt"
    out.mkdir()
    (out / "stale.txt").write_text("an earlier output")
    result = check(run(upcycle_command("--input", str(dense_ckpt), "--output", str(out),
                                       "--num-experts", "4", "--layer-freq", "2",
                                       "--seed", str(SEED), "--force"), cwd=out.parent))
    assert "layers [0, 2] of 4" in result.stdout, result.stdout
    return out


@pytest.fixture(scope="module")
def world():
    with world_of_one(QUIET):
        yield


def build(overrides: list[str], load: os.PathLike | None = None):
    from megamod.training.checkpoint import load_model_weights
    from megamod.models.build import build_model

    model = build_model(load_config(TINY_CONFIG, QUIET + overrides), load_tokenizer("tiny"))
    if load is not None:
        load_model_weights(load, model)
    return model.eval()


@pytest.fixture(scope="module")
def batch(world, dense_ckpt):
    from megamod.training.loop import build_loader

    with build_loader(load_config(TINY_CONFIG, QUIET), load_tokenizer("tiny")) as loader:
        return loader.next_step()[0]


@pytest.fixture(scope="module")
def dense(world, dense_ckpt):
    return build([], load=dense_ckpt)


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(batch["tokens"], batch["images"])


def test_upcycled_checkpoint_gives_the_dense_logits(dense, upcycled, batch):
    moe = build(MOE, load=upcycled)
    torch.testing.assert_close(logits(moe, batch), logits(dense, batch), atol=1e-5, rtol=0)
    # Not vacuous: tokens really went to several experts of both MoE layers.
    load = moe.routing_stats.load()
    assert load.shape == (2, 4) and ((load > 0).sum(1) >= 2).all(), load
    assert moe.routing_stats.dropped_fraction().max() == 0


def test_explicit_layer_list_gives_the_dense_logits(dense, batch):
    from megamod.moe.upcycle import upcycle_model

    moe = build(["moe.num_experts=4", "moe.layer_freq=[0,1,1,0]"])
    assert upcycle_model(dense, moe, seed=3) == 2
    assert moe.routing_stats.moe_layers == [1, 2]
    torch.testing.assert_close(logits(moe, batch), logits(dense, batch), atol=1e-5, rtol=0)


def test_experts_copy_the_ffn_and_everything_else_is_unchanged(dense, upcycled):
    dense_state = dense.state_dict()
    moe_state = build(MOE, load=upcycled).state_dict()
    ffn_keys = {LAYER.format(i) + f"mlp.linear_fc{j}.weight" for i in (0, 2) for j in (1, 2)}
    for i in (0, 2):
        for j in (1, 2):
            ffn = dense_state[LAYER.format(i) + f"mlp.linear_fc{j}.weight"]
            for e in range(4):
                expert = f"mlp.experts.local_experts.{e}.linear_fc{j}.weight"
                assert torch.equal(moe_state[LAYER.format(i) + expert], ffn), (i, j, e)
    rest = {k for k, v in moe_state.items()
            if isinstance(v, torch.Tensor) and ".experts." not in k and ".router." not in k}
    assert rest == {k for k, v in dense_state.items() if isinstance(v, torch.Tensor)} - ffn_keys
    for key in rest:
        assert torch.equal(moe_state[key], dense_state[key]), key
    assert LAYER.format(0) + "pre_mlp_layernorm.weight" in rest


def test_routers_come_from_the_seed(dense, upcycled):
    from megamod.moe.upcycle import upcycle_model

    def routers(model) -> list[torch.Tensor]:
        return [r.weight.detach().clone() for r in model.routers()]

    saved = routers(build(MOE, load=upcycled))
    model = build(MOE)
    fresh = routers(model)
    upcycle_model(dense, model, SEED)
    same_seed = routers(model)
    upcycle_model(dense, model, SEED + 1)
    other_seed = routers(model)
    assert len(saved) == 2 and not torch.equal(saved[0], saved[1])
    for a, b, c, d in zip(saved, same_seed, other_seed, fresh):
        assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)
        assert a.shape == (4, 128) and 0.015 < a.std().item() < 0.025  # init_method_std 0.02


def test_grouped_experts_and_fused_norms_are_mapped_too():
    """transformer-engine names (GPU): TEGroupedMLP experts `linear_fc1.weight{e}` and the
    dense layer's pre-MLP norm fused into fc1. A pure function: no model, no process."""
    from megamod.moe.upcycle import upcycle_state_dict

    t = {name: torch.randn(2, 3) for name in ("fc1", "fc2", "norm", "attn")}
    dense = {"d.0.mlp.linear_fc1.weight": t["fc1"], "d.0.mlp.linear_fc2.weight": t["fc2"],
             "d.0.mlp.linear_fc1.layer_norm_weight": t["norm"], "d.0.attn.weight": t["attn"],
             "d.0.mlp.linear_fc1._extra_state": None}
    expected = {"d.0.pre_mlp_layernorm.weight": t["norm"], "d.0.attn.weight": t["attn"],
                **{f"d.0.mlp.experts.linear_fc{j}.weight{e}": t[f"fc{j}"]
                   for j in (1, 2) for e in (0, 1)}}
    moe = {**{k: torch.zeros(2, 3) for k in expected},
           "d.0.mlp.router.weight": torch.zeros(2, 3), "d.0.mlp.experts._extra_state": None}
    mapped = upcycle_state_dict(dense, moe)
    assert mapped.keys() == expected.keys()
    assert all(mapped[k] is v for k, v in expected.items())
    with pytest.raises(RuntimeError, match="d.0.mlp.new.weight"):
        upcycle_state_dict(dense, {**moe, "d.0.mlp.new.weight": torch.zeros(2, 3)})
    with pytest.raises(RuntimeError, match="d.0.attn.weight"):  # a dense tensor left behind
        upcycle_state_dict(dense, {k: v for k, v in moe.items() if k != "d.0.attn.weight"})


def first_loss(stdout: str) -> float:
    records = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return next(r["train/loss"] for r in records if r.get("iteration") == 1)


def test_stage3_starts_at_expert_parallel_2_with_the_dense_loss(world, dense_ckpt, upcycled):
    from megamod.training.loop import forward_backward, setup

    result = megamod_train(2, QUIET + MOE + [
        "parallel.expert_model_parallel_size=2", f"checkpoint.load={upcycled}",
        "checkpoint.finetune=true", "train.train_iters=1",
        "train.lr_warmup_fraction=0",  # 1 warmup step of 1 fails upstream's check
    ], cwd=upcycled.parent)
    # The dense model's loss on the same first step, through the same setup().
    state = setup(load_config(TINY_CONFIG, QUIET + [f"checkpoint.load={dense_ckpt}",
                                                     "checkpoint.finetune=true"]))
    totals = forward_backward(state, state.loader.next_step())
    state.loader.close()
    assert first_loss(result.stdout) == pytest.approx((totals[0] / totals[1]).item(), abs=1e-4)


def test_missing_input_exits_2_naming_it(tmp_path, capsys):
    from megamod.__main__ import main

    missing = tmp_path / "stage2"
    assert main(["upcycle", "--input", str(missing), "--output", str(tmp_path / "out"),
                 "--num-experts", "4", "--layer-freq", "2"]) == 2
    assert f"{missing} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["existing output", "already MoE", "layer list too short"])
def test_bad_input_exits_2_naming_the_file_and_writes_nothing(
    dense_ckpt, upcycled, tmp_path, capsys, case
):
    from megamod.cli.upcycle import main

    out = tmp_path / "out"
    source, freq, expected = {
        "existing output": (dense_ckpt, "2", [str(out), "--force"]),
        "already MoE": (upcycled, "2", [str(upcycled), "already a MoE"]),
        "layer list too short": (dense_ckpt, "[1,0,1]", ["moe.layer_freq", "num_layers=4"]),
    }[case]
    if case == "existing output":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    before = sorted(tmp_path.rglob("*"))
    assert main(["--input", str(source), "--output", str(out), "--num-experts", "4",
                 "--layer-freq", freq]) == 2
    err = capsys.readouterr().err
    assert all(text in err for text in expected), err
    assert sorted(tmp_path.rglob("*")) == before
