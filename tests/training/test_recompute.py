"""Activation recomputation (`train.recompute_*`): megatron-core's own, through megamod's
dense, MoE, MoD and MoD+MoE decoder layers.

The reference is the same model without recomputation, from the same weights (random MoD
routers: a real selection), on one micro-batch mixing text-only, one-image and two-image
samples, fp32 on CPU. With full (uniform, block) and selective recomputation the loss,
every gradient, the routing and MoD statistics and megatron-core's aux-loss tracker equal
the reference's (statistics recorded once per forward, not again in the recompute), and
forward hooks show that the recompute happened: the recomputed modules ran twice, the
others once. One 2-process launch does the same at TP=2 + SP + EP=2 for MoD+MoE through
the training loop's path (this file is its worker: `python test_recompute.py OUT_DIR`, run
in tests/training/conftest.py's launch).
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import pytest
import torch

from megamod.config import load_config
from megamod.data.tokenizer import load_tokenizer
from megamod.errors import ConfigError
from tests.launcher import TINY_CONFIG, world_of_one

QUIET = ["checkpoint.save_dir=null", "checkpoint.save_interval=null", "logging.tensorboard_dir=null"]
# One sample per loader step, so the batch can mix text-only and image samples.
SHORT = ["model.language.seq_length=96", "data.max_skip_fraction=0.5",
         "train.micro_batch_size=1", "train.global_batch_size=1"]
MODELS = {
    "dense": [],
    "moe": ["moe.num_experts=4", "moe.z_loss_coeff=0.01"],
    "mod": ["mod.enabled=true"],  # PRD: layers 1-3 keep 75 / 25 / 15 % of the vision tokens
    "mod_moe": ["mod.enabled=true", "moe.num_experts=4", "moe.z_loss_coeff=0.01"],
    # Gumbel noise from megatron-core's RNG tracker: the recompute must replay it.
    "mod_moe_deepspeed": ["mod.enabled=true", "moe.num_experts=4", "moe.gate=deepspeed_top2",
                          "moe.capacity_factor=1.0"],
}
FULL = ["train.recompute_granularity=full"]
RECOMPUTE = {
    "full_uniform": FULL + ["train.recompute_method=uniform", "train.recompute_num_layers=2"],
    "full_block": FULL + ["train.recompute_method=block", "train.recompute_num_layers=3"],
    "selective": ["train.recompute_granularity=selective",
                  "train.recompute_modules=[core_attn,mlp]"],
    "selective_moe": ["train.recompute_granularity=selective",
                      "train.recompute_modules=[core_attn,mlp,moe]"],
}
# Selective with `moe` where there are MoE layers; the DeepSpeed gate under full only.
CASES = [(model, recompute) for model in MODELS for recompute in RECOMPUTE
         if recompute != ("selective" if "moe" in model else "selective_moe")
         and (model != "mod_moe_deepspeed" or recompute == "full_uniform")]


@pytest.fixture(scope="module")
def world():
    with world_of_one(QUIET):
        yield


@pytest.fixture(scope="module")
def batch(world) -> dict:
    from megamod.training.loop import build_loader
    from tests.mod.parallel_worker import mixed_micro_batches

    tokenizer = load_tokenizer("tiny")
    with build_loader(load_config(TINY_CONFIG, QUIET + SHORT), tokenizer) as loader:
        return mixed_micro_batches(loader, tokenizer.image_token_id)[0]  # 0, 1, 2 images


def build(overrides: list[str]):
    from megamod.models.build import build_model

    model = build_model(load_config(TINY_CONFIG, QUIET + SHORT + overrides), load_tokenizer("tiny"))
    return model.train()


def counted_modules(model) -> dict[str, torch.nn.Module]:
    """The modules whose forward calls tell what was recomputed, by a readable name."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    modules = {}
    for i, layer in enumerate(model.language_model.decoder.layers):
        modules[f"{i}.core_attention"] = layer.self_attention.core_attention
        modules[f"{i}.input_layernorm"] = layer.input_layernorm
        modules[f"{i}.pre_mlp_layernorm"] = layer.pre_mlp_layernorm
        if isinstance(layer.mlp, MoELayer):
            modules[f"{i}.moe.router"] = layer.mlp.router
            modules[f"{i}.moe.experts"] = layer.mlp.experts
        else:
            modules[f"{i}.mlp"] = layer.mlp
        if hasattr(layer, "mod_router"):
            modules[f"{i}.mod_router"] = layer.mod_router
    return modules


def step(model, batch: dict, rng_states: dict) -> dict:
    """One forward and backward from megatron-core's RNG tracker state `rng_states`: the
    loss, every gradient, the statistics recorded and the forward calls of each module."""
    from megatron.core import tensor_parallel
    from megatron.core.transformer.moe import moe_utils

    tensor_parallel.get_cuda_rng_tracker().set_states(dict(rng_states))  # forks write into it
    moe_utils.clear_aux_losses_tracker()
    modules, calls = counted_modules(model), collections.Counter()
    hooks = [module.register_forward_hook(lambda *_, name=name: calls.update([name]))
             for name, module in modules.items()]
    per_token = model(batch["tokens"], batch["images"], batch["labels"], batch["loss_mask"])
    mask = batch["loss_mask"].float()
    loss = (per_token * mask).sum() / mask.sum()
    loss.backward()
    for hook in hooks:
        hook.remove()
    stats = {}
    if model.routing_stats is not None:
        routing = model.routing_stats
        stats.update(counts=routing.counts.clone(), tokens=routing.tokens.clone(),
                     forwards=routing.forwards.clone())
        tracker = moe_utils.get_moe_layer_wise_logging_tracker()
        stats.update({f"tracker/{name}": entry["values"].clone()
                      for name, entry in tracker.items()})
    if model.mod_stats is not None:
        mod = model.mod_stats
        stats.update(kept=dict(mod.kept), candidates=dict(mod.candidates),
                     weights={layer: w.clone() for layer, w in mod.weights.items()})
    grads = {name: param.grad for name, param in model.named_parameters() if param.requires_grad}
    return {"loss": loss.detach(), "grads": grads, "stats": stats,
            "calls": {name: calls[name] for name in modules}}


@pytest.fixture(scope="module")
def references(world, batch) -> dict:
    """Per model: its initial weights (random MoD routers), the RNG state a step starts
    from, and that step without recomputation."""
    from megatron.core import tensor_parallel

    out = {}
    for name, overrides in MODELS.items():
        model = build(overrides)
        generator = torch.Generator().manual_seed(5)
        for layer in model.mod_layers():
            for param in layer.mod_router.parameters():
                param.data.normal_(0.0, 0.3, generator=generator)
        rng_states = dict(tensor_parallel.get_cuda_rng_tracker().get_states())
        weights = {k: v.clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()}
        out[name] = (weights, rng_states, step(model, batch, rng_states))
    return out


def expected_calls(name: str, recompute: str) -> int:
    """Forward calls of module `name` (`<layer>.<module>`) with `recompute`: 2 where it is
    recomputed, else 1."""
    layer, module = int(name.split(".")[0]), name.split(".", 1)[1]
    if recompute == "full_uniform":
        return 2
    if recompute == "full_block":  # the first 3 layers
        return 2 if layer < 3 else 1
    recomputed = {"core_attention", "mlp"}  # core_attn; dense MLPs, MoD layers' included
    if recompute == "selective_moe":
        recomputed |= {"moe.router", "moe.experts"}  # the whole MoE layer
    return 2 if module in recomputed else 1


def max_relative_difference(got: torch.Tensor, reference: torch.Tensor) -> float:
    return float((got - reference).abs().max() / reference.abs().max().clamp(min=1e-30))


@pytest.mark.parametrize("model_name, recompute", CASES)
def test_recompute_gives_the_gradients_and_statistics_of_no_recompute(
    world, batch, references, model_name, recompute
):
    weights, rng_states, reference = references[model_name]
    model = build(MODELS[model_name] + RECOMPUTE[recompute])
    model.load_state_dict(weights)
    got = step(model, batch, rng_states)

    assert max_relative_difference(got["loss"], reference["loss"]) <= 1e-6
    assert set(got["grads"]) == set(reference["grads"])
    for name, ref_grad in reference["grads"].items():
        assert got["grads"][name] is not None, name
        assert max_relative_difference(got["grads"][name], ref_grad) <= 1e-6, name

    # Recorded once per forward: the recompute adds nothing.
    stats, ref_stats = got["stats"], reference["stats"]
    assert set(stats) == set(ref_stats)
    for key, value in ref_stats.items():
        if isinstance(value, dict):
            assert stats[key].keys() == value.keys(), key
            for layer, ref in value.items():
                assert torch.equal(torch.as_tensor(stats[key][layer]), torch.as_tensor(ref)), key
        else:
            assert torch.equal(stats[key], value), key
    if "moe" in model_name:
        assert ref_stats["forwards"].sum() == 2  # layers 0 and 2, once each
        assert "tracker/load_balancing_loss" in ref_stats
    if "mod" in model_name:
        assert sum(ref_stats["kept"].values()) > 0

    for name, calls in got["calls"].items():
        assert calls == expected_calls(name, recompute), (name, calls)
    assert set(reference["calls"].values()) == {1}


def test_mod_layers_recompute_their_norms(world, batch, references, monkeypatch):
    """Selective `layernorm` recompute in MoD layers (whose MLP output is weighted before
    the residual add): the pre-MLP norm's output is dropped and recomputed in backward.
    megatron-core 0.16.1 runs it only with transformer-engine (megamod refuses it without:
    its CheckpointWithoutOutput reads TE's FP8 state whenever `fp8=False` is passed); here
    that flaw is patched out and the layers get the flags `TransformerLayer` sets for it."""
    from megatron.core.tensor_parallel import random as mcore_random

    init = mcore_random.CheckpointWithoutOutput.__init__

    def init_without_fp8(self, fp8=False):
        init(self, fp8)
        self.fp8 = bool(fp8)

    monkeypatch.setattr(mcore_random.CheckpointWithoutOutput, "__init__", init_without_fp8)
    weights, rng_states, reference = references["mod_moe"]
    model = build(MODELS["mod_moe"])
    model.load_state_dict(weights)
    for layer in model.language_model.decoder.layers:
        layer.recompute_input_layernorm = layer.recompute_pre_mlp_layernorm = True
    got = step(model, batch, rng_states)
    assert max_relative_difference(got["loss"], reference["loss"]) <= 1e-6
    for name, ref_grad in reference["grads"].items():
        assert max_relative_difference(got["grads"][name], ref_grad) <= 1e-6, name
    norms = {n: c for n, c in got["calls"].items() if n.endswith("layernorm")}
    assert norms and set(norms.values()) == {2}, norms


# ------------------------------------------------------------------- configuration


@pytest.mark.parametrize("overrides, message", [
    (["train.recompute_method=uniform"],
     "recompute_method=uniform applies to train.recompute_granularity=full only \\(it is null\\)"),
    (["train.recompute_granularity=selective", "train.recompute_num_layers=1"],
     "recompute_num_layers=1 applies to train.recompute_granularity=full"),
    (["train.recompute_modules=[mlp]"],
     "recompute_modules=\\['mlp'\\] applies to train.recompute_granularity=selective"),
    (FULL + ["train.recompute_num_layers=1"], "full needs train.recompute_method"),
    (FULL + ["train.recompute_method=block"], "needs train.recompute_num_layers >= 1"),
    (FULL + ["train.recompute_method=block", "train.recompute_num_layers=0"],
     "recompute_num_layers >= 1"),
    (["train.recompute_granularity=selective", "train.recompute_modules=[]"],
     "recompute_modules is empty"),
    (["train.recompute_granularity=selective", "train.recompute_modules=[mla_up_proj]"],
     "no multi-latent attention"),
    (["train.recompute_granularity=selective", "train.recompute_modules=[attn]"],
     "recompute_modules\\[0\\]='attn' is not one of"),
    (["train.recompute_granularity=partial"], "recompute_granularity='partial' is not one of"),
    # Groups form within each pipeline stage (here one, of all 4 layers).
    (FULL + ["train.recompute_method=uniform", "train.recompute_num_layers=3"],
     r"recompute_num_layers=3 layers within each pipeline stage, which hold \[4\] decoder layers"),
])
def test_config_refuses(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY_CONFIG, overrides)


@pytest.mark.parametrize("overrides, message", [
    (FULL + ["train.recompute_method=block", "train.recompute_num_layers=5"],
     "recompute_num_layers=5 exceeds model.language.num_layers=4"),
    (["train.recompute_granularity=selective", "train.recompute_modules=[moe]"], "no MoE layers"),
    (["moe.num_experts=4", "train.recompute_granularity=selective",
      "train.recompute_modules=[moe_act]"],
     "grouped-GEMM experts"),
    (["train.recompute_granularity=selective", "train.recompute_modules=[layernorm]"],
     "only with transformer-engine"),
])
def test_mapping_refuses(overrides, message):
    from megamod.models.transformer_configs import transformer_configs

    config = load_config(TINY_CONFIG, overrides)
    with pytest.raises(ConfigError, match=message):
        transformer_configs(config)


def test_mapping_applies_to_the_decoder_only():
    from megamod.models.transformer_configs import transformer_configs

    configs = transformer_configs(load_config(TINY_CONFIG, RECOMPUTE["full_block"]))
    language = configs.language
    assert (language.recompute_granularity, language.recompute_method,
            language.recompute_num_layers) == ("full", "block", 3)
    assert configs.vision.recompute_granularity is None
    assert configs.projector.recompute_granularity is None
    selective = load_config(TINY_CONFIG, ["train.recompute_granularity=selective"])
    # Megatron-LM's default
    assert transformer_configs(selective).language.recompute_modules == ["core_attn"]
    assert transformer_configs(load_config(TINY_CONFIG)).language.recompute_granularity is None


# ------------------------------------------------- TP=2 + SP + EP=2, the training path

PARALLEL_RUNS = {"none": [], "full": RECOMPUTE["full_uniform"],
                 "selective": RECOMPUTE["selective_moe"]}


def parallel_worker(out: Path) -> None:
    """MoD+MoE at TP=2 + SP + EP=2 (tests/mod/parallel_worker.py's step: setup() and the
    forward_backward schedule), once per `PARALLEL_RUNS` entry, from the same weights."""
    from tests.mod.parallel_worker import LAYOUTS, MOD, VARIANTS, step as training_step
    from tests.training.parallel_worker import start

    results = {}
    for name, recompute in PARALLEL_RUNS.items():
        config = start(1, False, MOD + VARIANTS["mod_moe"] + LAYOUTS["mod_moe"] + recompute)
        calls = collections.Counter()  # forward calls of the MoE and MoD routers (decoder only)
        hook = torch.nn.modules.module.register_module_forward_hook(
            lambda module, *_: calls.update([type(module).__name__]))
        result, model = training_step(config, None)
        hook.remove()
        result["calls"] = {kind: calls[kind] for kind in ("TopKRouterWithStats", "TokenRouter")}
        stats = model.routing_stats
        result["routing"] = torch.cat(
            [stats.counts.flatten(), stats.tokens.flatten(), stats.forwards])
        results[name] = result
    if torch.distributed.get_rank() == 0:
        torch.save(results, out / "recompute_tp2.pt")


@pytest.fixture(scope="module")
def parallel_results(worker_outputs) -> dict:
    """`parallel_worker`'s results, from tests/training/conftest.py's 2-process launch."""
    return torch.load(worker_outputs / "recompute" / "recompute_tp2.pt")


@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_tp2_sp_ep2_recompute_matches_no_recompute(parallel_results, recompute):
    reference, got = parallel_results["none"], parallel_results[recompute]
    assert got["disagreeing"] == [] and reference["disagreeing"] == []
    assert got["loss"] == pytest.approx(reference["loss"], rel=1e-6)
    assert got["kept"] == reference["kept"]
    assert torch.equal(got["routing"], reference["routing"])
    # 2 micro-batches x 2 MoE layers, x 3 MoD layers; recomputed: twice as many.
    assert reference["calls"] == {"TopKRouterWithStats": 4, "TokenRouter": 6}
    doubled = {"full": ("TopKRouterWithStats", "TokenRouter"),
               "selective": ("TopKRouterWithStats",)}
    assert got["calls"] == {kind: count * (2 if kind in doubled[recompute] else 1)
                            for kind, count in reference["calls"].items()}
    assert set(got["grads"]) == set(reference["grads"])
    for name, ref_grad in reference["grads"].items():
        assert max_relative_difference(got["grads"][name], ref_grad) <= 1e-6, name


if __name__ == "__main__":
    parallel_worker(Path(sys.argv[1]))
    torch.distributed.barrier()
