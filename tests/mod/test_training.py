"""p-MoD training through the CLI, as a user runs it: the issue's acceptance command (MoD +
MoE at TP=2 + SP + EP=2 on 2 processes) with its TensorBoard tags, and a dense checkpoint
fine-tuned into a MoD model (zero routers: every weight 1) without a jump in the loss.

The acceptance run goes through tests/moe/test_training.py's HOOKED_CLI, which records each
micro-batch's tokens and each MoD router's input, parameters and gradients; the logged
kept ratios and router-weight statistics are recomputed from those here (PRD's ratios by
hand, trunc(n_vision x ratio) per sample, TanhNorm of the router's logits), and the
routers' parameters after two steps against AdamW applied by hand to their recorded
gradients."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.launcher import TINY_CONFIG, check, megamod_commands
from tests.moe.test_training import by_step, hooked_train, image_token_id, layer_of, read_records
from tests.training.test_checkpoint import step_losses

QUIET = ["checkpoint.save_interval=null", "logging.tensorboard_dir=null"]
STEPS, MICRO_BATCHES = 3, 2  # global batch 8 = 2 micro-batches of 4 (DP=1)


@pytest.fixture(scope="module")
def mod_moe_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mod_moe")
    result = hooked_train(
        2, ["mod.enabled=true", "moe.num_experts=4", "moe.router_topk=2", "moe.layer_freq=2",
            "parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
            "parallel.expert_model_parallel_size=2", "parallel.expert_tensor_parallel_size=1",
            f"train.train_iters={STEPS}", f"checkpoint.save_dir={root}/ckpt",
            f"logging.tensorboard_dir={root}/tb"],
        root, root / "records",
    )
    (root / "stdout.txt").write_text(result.stdout)
    return root


@pytest.fixture(scope="module")
def events(mod_moe_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(mod_moe_run / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return events


def logged(events, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in events.Scalars(tag)}


def prd_keep(layer: int, num_layers: int = 4) -> float | None:
    """p-MoD's PRD by hand: r = cos(l pi / (L - 1)) / 2 + 1/2; a MoD layer where r <= 0.85,
    keeping max(r, 0.15) of the vision tokens."""
    r = math.cos(layer * math.pi / (num_layers - 1)) / 2 + 0.5
    return max(r, 0.15) if r <= 0.85 else None


def mod_reference(records: Path) -> dict[int, dict[int, dict[str, float]]]:
    """Per step and MoD layer, from rank 0's records (its view is what is logged): the
    kept share of the vision tokens, and the TanhNorm weights 0.2 tanh(x w + b) + 1 of
    the vision tokens recomputed in float64 from the router's input and parameters."""
    image_id = image_token_id()
    ranks = [by_step(read_records(records, rank), MICRO_BATCHES) for rank in (0, 1)]
    assert [len(steps) for steps in ranks] == [STEPS, STEPS]
    out = {}
    for step, (records0, records1) in enumerate(zip(*ranks), start=1):
        inputs0 = [r for r in records0 if r["kind"] == "mod_router"]
        inputs1 = [r for r in records1 if r["kind"] == "mod_router"]
        # Under SP each TP rank scores the whole gathered sequence: the same input on both.
        assert len(inputs0) == len(inputs1) == MICRO_BATCHES * 3
        assert all(torch.equal(a["input"], b["input"]) for a, b in zip(inputs0, inputs1))
        kept, candidates, weights = {}, {}, {}
        for record in records0:
            if record["kind"] == "batch":
                is_image = record["tokens"].t() == image_id  # [s, b]
            elif record["kind"] == "mod_router":
                layer = layer_of(record["name"])
                vision = is_image.sum(0).tolist()
                kept[layer] = kept.get(layer, 0) + sum(int(n * prd_keep(layer)) for n in vision)
                candidates[layer] = candidates.get(layer, 0) + sum(vision)
                weight, bias = record["weight"].double(), record["bias"].double()
                logits = (record["input"].double() @ weight.t() + bias).squeeze(-1)
                w = 0.2 * torch.tanh(logits) + 1.0
                weights.setdefault(layer, []).append(w[is_image])
        out[step] = {}
        for layer in kept:
            w = torch.cat(weights[layer]).numpy()
            out[step][layer] = {"kept_ratio": kept[layer] / candidates[layer], "mean": w.mean(),
                                "std": w.std(), "min": w.min(), "max": w.max()}
    return out


@pytest.fixture(scope="module")
def reference(mod_moe_run):
    return mod_reference(mod_moe_run / "records")


def test_mod_moe_at_tp2_sp_ep2_logs_kept_ratios_and_router_weights(mod_moe_run, events, reference):
    tags = set(events.Tags()["scalars"])
    assert "mod/kept_ratio/layer0" not in tags and prd_keep(0) is None
    assert [prd_keep(l) for l in (1, 2, 3)] == pytest.approx([0.75, 0.25, 0.15])
    assert sorted(reference) == list(range(1, STEPS + 1))
    for step, layers in reference.items():
        assert sorted(layers) == [1, 2, 3]
        for layer, expected in layers.items():
            # A quotient of integer counts (measured equal; float32 in TensorBoard).
            assert logged(events, f"mod/kept_ratio/layer{layer}")[step] == pytest.approx(
                expected["kept_ratio"], rel=1e-7), (layer, step)
            for stat in ("mean", "std", "min", "max"):
                got = logged(events, f"mod/router_weight/{stat}/layer{layer}")[step]
                # The run's fp32 weights (and float32 TensorBoard values) against float64:
                # measured at most 2.7e-8 apart for mean/min/max (~1) and 5.0e-9 for the
                # std (~1.3e-4).
                assert got == pytest.approx(expected[stat], rel=5e-8, abs=1e-8), (stat, layer, step)
    # Zero-initialised routers weigh every token 1 at step 1 (and step 2: step 1's lr is
    # 0); at step 3 the trained ones no longer do (layer 3's gets no gradient: below).
    assert all(reference[1][l]["std"] == 0.0 and reference[1][l]["mean"] == 1.0 for l in (1, 2, 3))
    assert all(reference[STEPS][l]["std"] > 1e-4 for l in (1, 2))
    assert {"moe/aux_loss", "moe/expert_load/image/layer0/expert0"} <= tags
    assert sorted(logged(events, "train/tflops_per_step")) == list(range(1, STEPS + 1))
    assert (mod_moe_run / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"


def test_the_mod_routers_train_as_adam_says_with_their_recorded_gradients(mod_moe_run, events):
    """The routers' parameters at step 3 against AdamW applied by hand (the config's
    betas and eps) to the gradients recorded at steps 1 and 2: per step summed over its
    micro-batches and both TP ranks (under SP each rank's backward reaches part of the
    router), divided by the step's loss tokens and clipped to the logged grad norm as
    megatron-core does. Step 1 runs at lr 0 (warm-up) but still feeds Adam's moments; the
    zero-initialised parameters make weight decay vanish until step 3."""
    lr, norm = logged(events, "train/lr"), logged(events, "train/grad_norm")
    assert lr[1] == 0.0 and lr[2] > 0
    ranks = [by_step(read_records(mod_moe_run / "records", rank), MICRO_BATCHES) for rank in (0, 1)]
    scaled = []
    for step in (1, 2):
        loss_tokens = sum(int(r["loss_mask"].sum())
                          for r in ranks[0][step - 1] if r["kind"] == "batch")
        factor = min(1.0, 1.0 / (norm[step] + 1e-6)) / loss_tokens  # clip_grad = 1.0
        grads: dict[str, torch.Tensor] = {}
        for records in ranks:
            for r in records[step - 1]:
                if r["kind"] == "mod_router_grad":
                    grads[r["name"]] = grads.get(r["name"], 0) + factor * r["grad"].double()
        scaled.append(grads)
    beta1, beta2, eps = 0.9, 0.999, 1e-8  # megamod's defaults (config.TrainConfig)
    step3 = {r["name"]: r for r in ranks[0][2] if r["kind"] == "mod_router"}
    assert len(step3) == 3 and all(len(grads) == 6 for grads in scaled)
    for name, record in step3.items():
        for param in ("weight", "bias"):
            g1, g2 = (grads[f"{name}.linear.{param}"] for grads in scaled)
            m = (beta1 * (1 - beta1) * g1 + (1 - beta1) * g2) / (1 - beta1**2)
            v = (beta2 * (1 - beta2) * g1**2 + (1 - beta2) * g2**2) / (1 - beta2**2)
            expected = -lr[2] * m / (v.sqrt() + eps)
            # Measured: at most 3.4e-10 apart (updates of ~3e-3; a missing TP rank's share,
            # a wrong normalisation or clip moves them by 1e-4 or more).
            torch.testing.assert_close(record[param].double(), expected, rtol=0, atol=7e-10)
    # Not vacuous: layers 1 and 2 moved. (Layer 3's router gets no gradient at all: in
    # the last layer its weights scale only vision positions' outputs, which carry no loss.)
    assert all(step3[f"language_model.decoder.layers.{l}.mod_router"]["weight"].abs().max() > 1e-3
               for l in (1, 2))


def test_dense_checkpoint_starts_mod_training_without_a_jump(tmp_path):
    """Fresh dense training, then from its checkpoint one step of dense and one of MoD
    (PRD) fine-tuning: all three start on the same first batch. The three `megamod train`
    runs, one after another, share one process (one start of megatron-core)."""
    finetune = [f"checkpoint.load={tmp_path}/dense", "checkpoint.finetune=true",
                "train.train_iters=1", "checkpoint.save_dir=null", *QUIET]
    fresh, dense, mod = (step_losses(check(result).stdout)[1] for result in megamod_commands([
        ["train", TINY_CONFIG, "train.train_iters=6", f"checkpoint.save_dir={tmp_path}/dense",
         "logging.tensorboard_dir=null"],
        ["train", TINY_CONFIG, *finetune],
        ["train", TINY_CONFIG, "mod.enabled=true", *finetune]], cwd=tmp_path))
    assert dense < fresh - 1.0, "the dense weights should already fit the data"
    # Dropping vision tokens (the skipped ones pass through with w = 1) costs a little:
    # far less than what the dense training gained.
    assert abs(mod - dense) < 0.25 * (fresh - dense)
