"""Packed rows compute exactly what one sample a row computes: each sample's logits, the
total loss and every gradient, for a dense decoder, MoE layers (aux and z losses on), p-MoD
(PRD, random routers: a real selection) and p-MoD + MoE. fp32, one process.

The reference runs the same samples one per row, padded to the longest (padding left out of
the routers and MoD layers); the packed run puts them, whole, into fewer rows with padding at
each row's end. Everything a token sees must be the same: its own sample's keys (packed
rows' attention, `PackedSeqParams`), its own positions (RoPE restarting at each sample), the
same MoD selection (top-k per sample, not per row), and MoE losses over the same real tokens
(padding and MoD filler slots never reach a router's losses, load statistics or capacity).
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from tests.launcher import world_of_one

BASE = ["checkpoint.save_dir=null", "checkpoint.save_interval=null", "logging.tensorboard_dir=null",
        "model.language.seq_length=256", "data.max_skip_fraction=0.5"]
MOE = ["moe.num_experts=4", "moe.router_topk=2", "moe.layer_freq=2", "moe.aux_loss_coeff=0.1",
       "moe.z_loss_coeff=0.01"]
VARIANTS = {
    "dense": [],
    "moe": MOE,
    # Dropping by probability: the same real tokens compete for the same capacity in
    # both layouts, so the same ones are dropped (padding taking slots, or counting in the
    # capacity, would change that).
    "moe_capacity": [*MOE, "moe.capacity_factor=1.0"],
    "mod": ["mod.enabled=true"],
    "mod_moe": ["mod.enabled=true", *MOE],
}
PATCHES = 16  # the tiny config's image tokens per image


def tiny_samples(config, tokenizer, n: int) -> list[dict]:
    """The tiny stream's first samples with 0, 1 and 2 images, each alone and unpadded."""
    from megamod.data.loader import build_train_loader, prepare_tiny_shards

    prepare_tiny_shards()
    config.train.global_batch_size = config.train.micro_batch_size = 1
    config.data.prefetch_steps = 0
    wanted = {0: 2, 1: 3, 2: 2}
    samples = []
    with build_train_loader(config, tokenizer, 0, 1) as loader:
        while len(samples) < n:
            (mb,) = loader.next_step()
            length = int((~mb["padding_mask"]).sum())
            images = len(mb["images"])
            if wanted.get(images, 0):
                wanted[images] -= 1
                samples.append({k: mb[k][0, :length] for k in ("tokens", "labels", "loss_mask")}
                               | {"images": mb["images"]})
    return samples


def one_per_row(samples: list[dict], pad_id: int) -> dict:
    width = max(len(s["tokens"]) for s in samples)
    batch = {"tokens": torch.full((len(samples), width), pad_id),
             "labels": torch.full((len(samples), width), -100),
             "loss_mask": torch.zeros(len(samples), width, dtype=torch.bool),
             "padding_mask": torch.ones(len(samples), width, dtype=torch.bool)}
    for r, s in enumerate(samples):
        n = len(s["tokens"])
        for key in ("tokens", "labels", "loss_mask"):
            batch[key][r, :n] = s[key]
        batch["padding_mask"][r, :n] = False
    batch["images"] = torch.cat([s["images"] for s in samples])
    return batch


def packed(rows: list[list[dict]], width: int, pad_id: int) -> dict:
    """Each row its samples back to back, then padding (segment -1) to `width`."""
    shape = (len(rows), width)
    batch = {"tokens": torch.full(shape, pad_id), "labels": torch.full(shape, -100),
             "loss_mask": torch.zeros(shape, dtype=torch.bool),
             "padding_mask": torch.ones(shape, dtype=torch.bool),
             "segment_ids": torch.full(shape, -1), "position_ids": torch.zeros(shape, dtype=torch.long)}
    for r, row in enumerate(rows):
        start = 0
        for j, s in enumerate(row):
            n = len(s["tokens"])
            for key in ("tokens", "labels", "loss_mask"):
                batch[key][r, start : start + n] = s[key]
            batch["padding_mask"][r, start : start + n] = False
            batch["segment_ids"][r, start : start + n] = j
            batch["position_ids"][r, start : start + n] = torch.arange(n)
            start += n
    batch["images"] = torch.cat([s["images"] for row in rows for s in row])
    return batch


def run(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Logits (no labels), then the loss sum and the gradients of one forward/backward."""
    model.zero_grad(set_to_none=True)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "loss_mask")}
    with torch.no_grad():
        logits = model(**inputs)
    losses = model(**batch)
    loss = (losses * batch["loss_mask"]).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits, loss.detach(), grads


def assert_logits_per_sample(logits, ref_logits, rows: list[list[dict]], tolerance: float) -> None:
    """Each packed sample's logits are its logits when alone in a row."""
    i = 0
    for r, row in enumerate(rows):
        start = 0
        for s in row:
            n = len(s["tokens"])
            torch.testing.assert_close(logits[r, start : start + n], ref_logits[i, :n],
                                       atol=tolerance, rtol=tolerance)
            start, i = start + n, i + 1


def check_rotary_follows_positions(model) -> None:
    """The angles the decoder gets are those of each token's position (attention scores
    only see position differences, so the equality test alone cannot show this)."""
    language = model.language_model
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [3, 4, 5, 0, 1, 2]])
    hidden = torch.zeros(6, 2, language.config.hidden_size)
    rotary = language._preprocess(None, positions, decoder_input=hidden)[1]
    angles = language.rotary_pos_emb(6)  # [6, 1, 1, d]: positions 0..5
    assert rotary.shape == (6, 2, 1, angles.shape[-1])
    for b in range(2):
        for s in range(6):
            assert torch.equal(rotary[s, b, 0], angles[positions[b, s], 0, 0])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packed_rows_equal_one_sample_a_row(variant):
    from megamod.config import load_config
    from megamod.data.tokenizer import load_tokenizer
    from megamod.models.build import build_model
    from tests.launcher import TINY_CONFIG

    overrides = BASE + VARIANTS[variant]
    with world_of_one(overrides):
        config = load_config(TINY_CONFIG, overrides + ["data.packing=true"])
        tokenizer = load_tokenizer("tiny")
        torch.manual_seed(0)
        model = build_model(config, tokenizer)
        generator = torch.Generator().manual_seed(5)
        for layer in model.mod_layers():  # distinct router weights: a real selection
            for param in layer.mod_router.parameters():
                param.data.normal_(0.0, 0.3, generator=generator)
        samples = tiny_samples(load_config(TINY_CONFIG, overrides), tokenizer, 7)
        lengths = [len(s["tokens"]) for s in samples]
        assert max(lengths) * 2 < 256  # rows of 256 hold several samples each
        # Rows mixing text-only, one- and two-image samples, each row ending in padding.
        rows = [samples[0:3], samples[3:5], samples[5:7]]
        assert all(sum(len(s["tokens"]) for s in row) < 256 for row in rows)

        if variant == "dense":  # RoPE follows each sample's own positions
            check_rotary_follows_positions(model)
        ref_logits, ref_loss, ref_grads = run(model, one_per_row(samples, tokenizer.pad_id))
        reference_kept = model.mod_stats.scalars() if model.mod_stats else None
        reference_routed = routed(model)
        logits, loss, grads = run(model, packed(rows, 256, tokenizer.pad_id))
        packed_kept = model.mod_stats.scalars() if model.mod_stats else None
        packed_routed = routed(model)

    assert_logits_per_sample(logits, ref_logits, rows, tolerance=1e-5)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-6)
    assert set(grads) == set(ref_grads)
    for name, ref in ref_grads.items():
        if "mod_router" not in name or ".layers.3." not in name:  # the last router reaches no loss
            assert ref.abs().sum() > 0, f"{name} got no gradient"
        torch.testing.assert_close(grads[name], ref, atol=1e-5, rtol=1e-4, msg=name)
    if reference_kept is not None:  # the same tokens kept, per sample
        assert packed_kept == pytest.approx(reference_kept, abs=1e-7)
    if reference_routed is not None:
        # Routers counted exactly the real tokens (MoD: the kept ones), in both layouts, and
        # sent them to the same experts: padding and filler slots reached no expert.
        tokens, slots = packed_routed
        assert torch.equal(tokens, reference_routed[0]) and torch.equal(slots, reference_routed[1])
        mod_layers = {layer.layer_number - 1 for layer in model.mod_layers()}
        for layer in model.routing_stats.moe_layers:
            routed_tokens = tokens[layer].sum()  # two forwards (logits, loss) a run
            if layer in mod_layers:  # the kept tokens only
                assert 0 < routed_tokens < 2 * sum(lengths)
            else:
                assert routed_tokens == 2 * sum(lengths)
            if "capacity" not in variant:
                assert slots[layer].sum() == 2 * routed_tokens  # top-2, nothing dropped


def test_packed_rows_out_of_layout_refused():
    """Core attention cuts rows by sample lengths, so a row whose samples are out of order,
    split, or followed by a sample after padding is refused, not attended across."""
    from megamod.config import load_config
    from megamod.data.tokenizer import load_tokenizer
    from megamod.models.build import build_model
    from tests.launcher import TINY_CONFIG

    with world_of_one(BASE):
        config = load_config(TINY_CONFIG, BASE + ["data.packing=true"])
        tokenizer = load_tokenizer("tiny")
        model = build_model(config, tokenizer)
        samples = tiny_samples(load_config(TINY_CONFIG, BASE), tokenizer, 2)
        assert sum(len(s["tokens"]) for s in samples) < 256  # two samples and padding
        good = packed([samples], 256, tokenizer.pad_id)
        with torch.no_grad():
            model(**{k: v for k, v in good.items() if k not in ("labels", "loss_mask")})
        n = len(samples[0]["tokens"])
        for name, edit in [("swapped", lambda seg: seg[0, :n].fill_(1)),
                           ("split", lambda seg: seg[0, 2].fill_(1)),
                           ("after padding", lambda seg: seg[0, -1].fill_(0))]:
            bad = {k: v.clone() for k, v in good.items() if k not in ("labels", "loss_mask")}
            edit(bad["segment_ids"])
            with pytest.raises(ValueError, match="in order from the row's start"), torch.no_grad():
                model(**bad)


def test_packed_rows_in_bf16_with_a_sentencepiece_tokenizer(llama_sp_tokenizer):
    """What real runs differ in: bf16 weights and activations (the model cast as megatron-core's
    Float16Module casts it) and a Vicuna-style SentencePiece tokenizer, p-MoD + MoE. Packed
    rows keep the same tokens in every MoD layer as one sample a row, and the logits, loss
    and gradients within bf16's rounding (measured: logits equal, gradients within 0.25 % of
    each tensor's largest)."""
    from megamod.config import load_config
    from megamod.data.tokenizer import load_tokenizer
    from megamod.models.build import build_model
    from tests.launcher import TINY_CONFIG

    overrides = BASE + VARIANTS["mod_moe"] + [
        "precision.params_dtype=bf16", f"data.tokenizer={llama_sp_tokenizer}",
        "model.language.seq_length=512"]
    with world_of_one(overrides):
        config = load_config(TINY_CONFIG, overrides + ["data.packing=true"])
        tokenizer = load_tokenizer(str(llama_sp_tokenizer))
        torch.manual_seed(0)
        model = build_model(config, tokenizer).bfloat16()
        generator = torch.Generator().manual_seed(5)
        for layer in model.mod_layers():
            for param in layer.mod_router.parameters():
                param.data.copy_(torch.empty(param.shape).normal_(0.0, 0.3, generator=generator))
        samples = tiny_samples(load_config(TINY_CONFIG, overrides), tokenizer, 7)
        rows = [samples[0:3], samples[3:5], samples[5:7]]
        assert all(sum(len(s["tokens"]) for s in row) < 512 for row in rows)
        # The reference rows hold one sample each, as packed rows (the same attention kernel
        # call per sample: bf16 rounds alike, so no top-2 choice near a tie flips on a
        # rounding difference; the fp32 test compares against plain causal rows).
        longest = max(len(s["tokens"]) for s in samples)
        batches = [packed([[s] for s in samples], longest, tokenizer.pad_id),
                   packed(rows, 512, tokenizer.pad_id)]
        for batch in batches:
            batch["images"] = batch["images"].bfloat16()
        ref_logits, ref_loss, ref_grads = run(model, batches[0])
        reference_kept = model.mod_stats.scalars()
        model.mod_stats.reset()
        logits, loss, grads = run(model, batches[1])
        assert model.mod_stats.scalars() == pytest.approx(reference_kept, abs=1e-7)

    assert ref_logits.dtype == torch.bfloat16
    assert_logits_per_sample(logits, ref_logits, rows, tolerance=1e-2)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-3, atol=0)
    assert set(grads) == set(ref_grads)
    for name, ref in ref_grads.items():
        scale = ref.float().abs().max().item()
        assert (grads[name].float() - ref.float()).abs().max().item() <= 0.01 * scale, name


def routed(model):
    """(tokens routed per layer and modality, filled expert slots) since the last call, or
    None without MoE; resets the statistics (MoD's too)."""
    if model.mod_stats is not None:
        model.mod_stats.reset()
    if model.routing_stats is None:
        return None
    result = model.routing_stats.tokens.clone(), model.routing_stats.counts.clone()
    model.routing_stats.reset()
    return result


def test_packed_training_resumes_at_another_dp_size_exactly(tmp_path):
    """p-MoD's tiny config with packing: 4 steps at DP=2 (a checkpoint at step 2), then
    steps 3-4 again from that checkpoint in one process. The rows are the global stream's,
    whatever the DP size, so the losses are the uninterrupted run's."""
    from megamod.config import load_config
    from megamod.data.loader import build_train_loader, prepare_tiny_shards
    from megamod.data.tokenizer import load_tokenizer
    from tests.launcher import REPO, check, run, torchrun

    config = REPO / "examples" / "configs" / "pmod" / "tiny.yaml"
    common = ["data.packing=true", "train.train_iters=4", "checkpoint.save_interval=2",
              f"checkpoint.save_dir={tmp_path}/ckpt", "logging.tensorboard_dir=null"]
    first = torchrun(2, ["-m", "megamod", "train", str(config), *common], cwd=tmp_path)
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "ckpt" / "iter_0000002", resumed_dir / "iter_0000002")
    (resumed_dir / "latest_checkpointed_iteration.txt").write_text("2\n")
    second = check(run([sys.executable, "-m", "megamod", "train", str(config), *common[:-2],
                        f"checkpoint.save_dir={resumed_dir}", "logging.tensorboard_dir=null"], cwd=tmp_path))

    def records(stdout):
        return {r["iteration"]: r for r in map(json.loads, filter(lambda l: l.startswith("{"), stdout.splitlines()))
                if "iteration" in r}

    uninterrupted, resumed = records(first.stdout), records(second.stdout)
    assert sorted(resumed) == [3, 4]
    for it in (3, 4):
        assert resumed[it]["data/samples_per_step"] == uninterrupted[it]["data/samples_per_step"]
        assert resumed[it]["train/loss"] == pytest.approx(uninterrupted[it]["train/loss"], abs=1e-5)
    # Packing wastes far less of the rows than one sample a row, padded to seq_length or to
    # its micro-batch's longest sample (the same tiny stream, counted by its loader).
    packed = sum(r["data/padding_fraction"] for r in uninterrupted.values()) / 4
    prepare_tiny_shards()
    unpacked = {}
    for padding in ("max_length", "longest"):
        unpacked_config = load_config(config, ["data.prefetch_steps=0", f"data.padding={padding}"])
        with build_train_loader(unpacked_config, load_tokenizer("tiny"), 0, 1) as loader:
            masks = [mb["padding_mask"] for _ in range(4) for mb in loader.next_step()]
        unpacked[padding] = float(sum(m.sum() for m in masks) / sum(m.numel() for m in masks))
    assert packed < unpacked["longest"] / 1.5 and packed < unpacked["max_length"] / 4, (packed, unpacked)
