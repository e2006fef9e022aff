"""Pipeline parallelism gives the loss and every gradient of one process: megatron-core's
1F1B schedule over two stages (the vision encoder, projector and embedding on the first,
the output layer and loss on the second, two decoder layers each), for a dense decoder
(with its output layer apart from the embedding, and tied to it),
MoE with EP=2 (aux + z losses from both stages), MoD (PRD, its layers on both stages) and
MoD + MoE on packed rows; at PP=2 x DP=2 and at TP=2 + SP x PP=2. fp32 on CPU, through
setup() -> megatron-core DDP -> the schedule -> finalize_model_grads.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.launcher import REPO, check, megamod_commands, megamod_train


@pytest.fixture(scope="module")
def results(worker_outputs):
    """pipeline_worker.py's `init` (1 process) and `grads` (4 processes), in
    tests/training/conftest.py's launches."""
    return {p.stem: torch.load(p) for p in (worker_outputs / "pipeline").glob("grads_*.pt")}


CASES = ["dense_pp2_dp2", "dense_tp2_sp_pp2", "tied_pp2_dp2", "moe_pp2_dp2_ep2",
         "moe_tp2_sp_pp2_ep2", "mod_tp2_sp_pp2", "mod_moe_tp2_sp_pp2_ep2"]
EMBEDDING, OUTPUT = "language_model.embedding.word_embeddings.weight", "language_model.output_layer.weight"


@pytest.mark.parametrize("case", CASES)
def test_pp2_matches_single_process(results, case):
    variant = "mod_moe" if case.startswith("mod_moe") else case.split("_")[0]
    reference, other = results[f"grads_{variant}_ref"], results[f"grads_{case}"]
    assert other["tokens"] == reference["tokens"] > 0
    assert other["loss"] == pytest.approx(reference["loss"], abs=1e-5)
    assert other["disagreeing"] == [], "replicas on different ranks disagree"
    if variant == "tied":  # the last stage's copy got the same (all-reduced) gradient
        assert OUTPUT not in reference["grads"]
        torch.testing.assert_close(other["grads"].pop(OUTPUT), other["grads"][EMBEDDING])
    # Every parameter of both stages: the vision encoder's (first) and the output layer's
    # (last) among them, each decoder layer under its global number.
    assert set(other["grads"]) == set(reference["grads"])
    layers = {int(n.split(".")[3]) for n in reference["grads"] if n.startswith("language_model.decoder.layers.")}
    assert layers == {0, 1, 2, 3}
    if "moe" in variant:
        routers = [n for n in reference["grads"] if n.endswith("router.weight") and ".mod_router." not in n]
        assert routers == [f"language_model.decoder.layers.{i}.mlp.router.weight" for i in (0, 2)]
    if variant.startswith("mod"):  # the same tokens kept in every layer, on either stage
        assert other["kept"] == pytest.approx(reference["kept"], rel=1e-5)
        assert {k for k in other["kept"] if k.startswith("mod/kept_ratio/")} == {
            f"mod/kept_ratio/layer{i}" for i in (1, 2, 3)}
    for name, ref_grad in reference["grads"].items():
        # MoD's last layer: its vision outputs reach no loss token, its router learns nothing.
        if ".layers.3.mod_router." not in name:
            assert ref_grad.abs().sum() > 0, f"{name} got no gradient"
        torch.testing.assert_close(other["grads"][name], ref_grad, atol=1e-5, rtol=1e-4, msg=name)


# ------------------------------------------------------------------ resuming across PP

PMOD_MOE = REPO / "examples" / "configs" / "pmod" / "tiny_moe.yaml"
# The acceptance layout: 4 processes, TP=2 + SP x PP=2, EP=2 over the TP ranks,
# the distributed optimizer.
PP2_LAYOUT = ["parallel.pipeline_model_parallel_size=2", "parallel.tensor_model_parallel_size=2",
              "parallel.sequence_parallel=true", "parallel.expert_model_parallel_size=2",
              "parallel.expert_tensor_parallel_size=1", "parallel.use_distributed_optimizer=true"]


def _records(stdout: str) -> dict[int, dict]:
    """Each step's logged record, by iteration."""
    records = [json.loads(line) for line in stdout.splitlines() if line.startswith('{"iteration"')]
    return {r["iteration"]: r for r in records}


def _train(nproc: int, config, overrides: list[str], cwd) -> dict[int, dict]:
    return _records(megamod_train(nproc, overrides, cwd, timeout=600, config=config).stdout)


def _coffee(cwd) -> str:
    import numpy as np
    import skimage.data
    from PIL import Image

    image = cwd / "coffee.png"
    Image.fromarray(np.asarray(skimage.data.coffee())).save(image)
    return str(image)


def _routing_command(save_dir) -> list:
    """`megamod inspect --routing` of a save_dir's latest checkpoint (a one-process tool)."""
    return ["inspect", save_dir, "--routing", "--data", "tiny", "--batches", "2", "--json"]


def _generate_command(save_dir, image: str) -> list:
    """`megamod generate` (greedy, one process, the MoD-pruned KV cache) from a save_dir."""
    return ["generate", "--checkpoint", save_dir, "--image", image, "--prompt", "What is in the picture?",
            "--max-new-tokens", "8", "--json"]


def test_checkpoints_resume_across_pipeline_sizes(tmp_path):
    """p-MoD + MoE (tiny_moe): one process trains 6 steps, saving every 2. Its iteration-2
    checkpoint resumes at TP=2 + SP x PP=2 (EP=2, the distributed optimizer; saved at 4),
    which resumes at one process for steps 5-6: every step's loss is the uninterrupted
    run's, and so is every evaluation (`eval.interval`). `inspect --routing` and `generate`
    (one-process tools) read the PP=2 checkpoint whole: its experts route the tiny data, and
    it answers, as the one-process run's iteration 4 does."""
    common = ["train.train_iters=6", "train.lr_warmup_fraction=0.0", "logging.tensorboard_dir=null",
              "eval.interval=2", "eval.shards=[tiny]", "eval.iters=1"]
    whole = tmp_path / "whole"
    reference = _train(1, PMOD_MOE, common + [f"checkpoint.save_dir={whole}",
                                              "checkpoint.save_interval=2"], tmp_path)
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]
    resumed, whole_at_4 = tmp_path / "resumed", tmp_path / "whole_at_4"
    for folder, iteration in ((resumed, 2), (whole_at_4, 4)):
        shutil.copytree(whole / f"iter_{iteration:07d}", folder / f"iter_{iteration:07d}")
        (folder / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")

    pp2 = _train(4, PMOD_MOE, common + PP2_LAYOUT + [
        f"checkpoint.save_dir={resumed}", "train.train_iters=4"], tmp_path)
    # The one-process commands in one process, in this order: the tools read `resumed`
    # before the last training adds iteration 6 to it.
    image = _coffee(tmp_path)
    *tools, last = megamod_commands([
        _routing_command(resumed), _generate_command(resumed, image),
        _routing_command(whole_at_4), _generate_command(whole_at_4, image),
        ["train", PMOD_MOE, *common, f"checkpoint.save_dir={resumed}"]], tmp_path, timeout=600)
    routing_pp2, answer_pp2, routing_pp1, answer_pp1 = (
        json.loads(check(result).stdout.splitlines()[-1]) for result in tools)
    pp1 = _records(check(last).stdout)

    assert sorted(pp2) == [3, 4] and sorted(pp1) == [5, 6]
    for step, record in {**pp2, **pp1}.items():
        assert record["train/loss"] == pytest.approx(reference[step]["train/loss"], rel=1e-5), step
    # Evaluation during training (held-out loss, routing and MoD kept ratios at evaluation)
    # over both stages, as one process evaluates.
    for step, record in ((4, pp2[4]), (6, pp1[6])):
        evaluated = {k: v for k, v in reference[step].items() if k.startswith("eval/")}
        assert "eval/loss" in evaluated and "eval/mod/kept_ratio" in evaluated
        assert {k: v for k, v in record.items() if k.startswith("eval/")} == pytest.approx(
            evaluated, rel=1e-4, abs=1e-6), step
    assert answer_pp2["text"] == answer_pp1["text"]  # greedy: the same tokens
    pp2_routes, pp1_routes = routing_pp2["routing"], routing_pp1["routing"]
    assert pp2_routes["moe_layers"] == pp1_routes["moe_layers"] == [0, 2]  # one on each stage
    assert pp2_routes["tokens"] == pp1_routes["tokens"]
    for modality, load in pp1_routes["load"].items():
        torch.testing.assert_close(torch.tensor(pp2_routes["load"][modality]), torch.tensor(load),
                                   atol=1e-6, rtol=0, msg=modality)
