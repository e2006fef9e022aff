"""`megamod train CONFIG --dry-run` and its memory model (megamod.training.plan).

The references are independent of the plan's arithmetic:
- activations: the bytes of the distinct storages autograd saves during one forward of a
  micro-batch (`torch.autograd.graph.saved_tensors_hooks`), measured on real models at
  small shapes on CPU, against `activation_bytes(..., LOCAL)` (megatron-core's local
  spec, what runs here); dense, MoE (both gates), p-MoD, frozen parts, full and selective
  recomputation. At these shapes the estimate is within 0.2 % of the measurement.
- per-rank parameters and activations at TP=2 + SP, EP=2: the real model built in a
  2-process job (this file is its worker), against the counts the plan derives from a
  meta-device model built at TP=1.
- the 7B figures: a hand count of Llama-7B's parameters, 18 bytes per trainable parameter
  for Adam in mixed precision (2 weights + 4 fp32 gradient + 12 fp32 main copy and
  moments), and LLaVA-1.5-7B's official SFT (micro-batch 16 at 2048 tokens on 8 GPUs fits
  80 GB with gradient checkpointing, not without).
- every shipped real-size config passes at the GPU count its comment documents. The
  stage checkpoints, data and Vicuna's tokenizer do not exist here: they run with
  `checkpoint.load=null`, a small shard folder (the bundled tiny data set's) and a
  stand-in tokenizer of the real kind (tests/sp_tokenizer.py, 801 tokens), with
  `model.language.vocab_size=32000` (Vicuna's) so the memory math is real-size.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if __name__ == "__main__":  # the 2-process worker (tests/training/conftest.py)
    sys.path.insert(0, str(REPO))

from tests.launcher import TINY_CONFIG, world_of_one  # noqa: E402

# Measured agreement at these shapes: <= 0.2 % (routing bookkeeping at random routing).
TOLERANCE = 0.01
BF16 = ["precision.params_dtype=bf16", "train.micro_batch_size=2", "train.global_batch_size=4"]
MOE = ["moe.num_experts=4", "moe.layer_freq=2"]
STAGE3 = ["moe.gate=deepspeed_top2", "moe.capacity_factor=1.5", "train.trainable=[ffn,router,projector]"]
FULL = ["train.recompute_granularity=full", "train.recompute_method=uniform"]
VARIANTS = {
    "dense": [],
    "dense_fp32": ["precision.params_dtype=fp32"],
    "moe": MOE,
    "mod": ["mod.enabled=true"],
    "mod_moe_stage3": ["mod.enabled=true", *MOE, *STAGE3],
    "projector_only": ["train.trainable=[projector]"],
    "full_recompute": [*FULL, "train.recompute_num_layers=1"],
    "full_recompute_moe": [*MOE, *FULL, "train.recompute_num_layers=2"],
    "block_recompute_mod": ["mod.enabled=true", "train.recompute_granularity=full",
                            "train.recompute_method=block", "train.recompute_num_layers=3"],
    "selective_recompute_mod": ["mod.enabled=true", "train.recompute_granularity=selective",
                                "train.recompute_modules=[mlp,core_attn]"],
    "selective_recompute": [*MOE, *STAGE3, "train.recompute_granularity=selective",
                            "train.recompute_modules=[moe,mlp,core_attn]"],
}
TP2 = [*BF16, *MOE, "mod.enabled=true", "parallel.tensor_model_parallel_size=2",
       "parallel.sequence_parallel=true", "parallel.expert_model_parallel_size=2",
       "parallel.expert_tensor_parallel_size=1", "moe.capacity_factor=1.5",
       "moe.eval_capacity_factor=1.5", "moe.pad_expert_input_to_capacity=true"]
REAL_CONFIGS = ["moe_llava/stage1", "moe_llava/stage2", "moe_llava/stage3",
                "pmod/llava15_7b", "pmod/llava15_7b_moe"]


def micro_batch(config, tokenizer) -> tuple[torch.Tensor, ...]:
    """tokens, images, labels, loss mask of `train.micro_batch_size` samples at seq_length,
    one image each (its placeholders after 3 text tokens), loss on the rest."""
    batch, seq = config.train.micro_batch_size, config.model.language.seq_length
    patches, size = config.model.vision.num_patches, config.model.vision.image_size
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(5, 100, (batch, seq), generator=generator)
    tokens[:, 3 : 3 + patches] = tokenizer.image_token_id
    labels = torch.randint(5, 100, (batch, seq), generator=generator)
    loss_mask = torch.ones(batch, seq)
    loss_mask[:, : 3 + patches] = 0
    return tokens, torch.randn(batch, 3, size, size, generator=generator), labels, loss_mask


def saved_activation_bytes(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    """Bytes of the distinct storages autograd saves during one forward, parameters aside;
    summed after the forward (megatron-core's CheckpointWithoutOutput frees some)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        # Keyed by the storage itself (held here, so never reused), not its address: a
        # storage CheckpointWithoutOutput frees gives its address to the next allocation.
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage._cdata] = storage
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(*inputs)
    return sum(storage.nbytes() for storage in storages.values())


def build(config):
    """The model a run of `config` trains (megatron-core DDP, Float16Module for bf16)."""
    from megamod.data.tokenizer import load_tokenizer
    from megamod.models.build import build_model
    from megamod.training.optimizer import wrap_model

    tokenizer = load_tokenizer(config.data.tokenizer)
    model = build_model(config, tokenizer)
    return model, wrap_model(config, model), tokenizer


# ------------------------------------------------------------------------- activations


class TestActivations:
    """One world of one (TP=1) for every variant's model; gone before the other tests."""

    @pytest.fixture(scope="class")
    def tiny_world(self):
        with world_of_one(BF16) as config:
            yield config

    @pytest.mark.parametrize("variant", list(VARIANTS))
    def test_estimate_matches_what_autograd_saves(self, tiny_world, variant):
        from megamod.config import load_config
        from megamod.models.build import vocab_size
        from megamod.training.plan import LOCAL, activation_bytes

        config = load_config(TINY_CONFIG, BF16 + VARIANTS[variant])
        _, ddp, tokenizer = build(config)
        measured = saved_activation_bytes(ddp, micro_batch(config, tokenizer))
        estimate = activation_bytes(config, vocab_size(config, tokenizer.vocab_size), LOCAL)
        # Under full recompute a tensor another model of this process left cached (35 KB
        # here) is saved as a checkpointed group's input: measured 0.0 % off in a fresh
        # process, 2.0 % after tests/training/test_flops.py's forwards.
        tolerance = 0.025 if variant.startswith("full_recompute") else TOLERANCE
        assert estimate.saved == pytest.approx(measured, rel=tolerance), (variant, estimate)


def test_recomputation_keeps_less_and_adds_a_working_set():
    from megamod.config import load_config
    from megamod.training.plan import activation_bytes

    plain = activation_bytes(load_config(TINY_CONFIG, BF16 + MOE), 896)
    full = activation_bytes(load_config(TINY_CONFIG, BF16 + MOE + FULL + ["train.recompute_num_layers=2"]), 896)
    # Groups of two layers: the larger pair is rebuilt in backward.
    assert full.recompute_working_set == max(sum(plain.layers[:2]), sum(plain.layers[2:]))
    assert full.decoder < plain.decoder / 10 and plain.recompute_working_set == 0


# ------------------------------------------------------------------------- pipeline stages

PP2 = ["parallel.pipeline_model_parallel_size=2"]
TIED = ["model.language.untie_embeddings_and_output_weights=false"]
# MoE on layers 0 and 2, p-MoD's routers on the later layers: each stage holds both kinds.
STAGED = [*MOE, "mod.enabled=true"]
TINY_VOCAB_ROWS = 896  # the tiny tokenizer's, padded


@pytest.fixture(scope="module")
def tiny_shapes() -> dict[str, list]:
    """The STAGED tiny model's parameters as the dry run sees them (meta device, TP=1,
    PP=1), with untied (the default) and tied embeddings."""
    from megamod.config import load_config
    from megamod.data.tokenizer import load_tokenizer
    from megamod.models.build import with_vocab_size
    from megamod.training.plan import meta_model, parameter_shapes

    shapes = {}
    for tie, overrides in (("untied", []), ("tied", TIED)):
        config = load_config(TINY_CONFIG, STAGED + overrides)
        tokenizer = load_tokenizer(config.data.tokenizer)
        with meta_model(with_vocab_size(config, TINY_VOCAB_ROWS), tokenizer) as model:
            shapes[tie] = parameter_shapes(model)
    return shapes


@pytest.mark.parametrize("tie", ["untied", "tied"])
def test_stages_split_the_parameters_of_the_whole_model(tiny_shapes, tie):
    from megamod.config import load_config
    from megamod.parallel import parallel_layout
    from megamod.training.plan import WORD_EMBEDDING, count_parameters, pipeline_stages

    shapes, tied = tiny_shapes[tie], tie == "tied"
    split = ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
             "parallel.expert_model_parallel_size=2",
             "parallel.expert_tensor_parallel_size=1"]
    extra = STAGED + split + (TIED if tied else [])
    whole_config, config = load_config(TINY_CONFIG, extra), load_config(TINY_CONFIG, extra + PP2)
    whole = count_parameters(shapes, parallel_layout(whole_config.parallel, 2), whole_config.moe)
    stages = pipeline_stages(config)
    assert [stage.layers for stage in stages] == [range(2), range(2, 4)]
    counts = [count_parameters(shapes, parallel_layout(config.parallel, 4), config.moe, stage)
              for stage in stages]
    # Tied: the last stage's copy of the word embedding, 896 x 128 split over TP=2.
    copy = TINY_VOCAB_ROWS * 128 // 2 if tied else 0
    assert sum(c.per_rank for c in counts) == whole.per_rank + copy
    assert sum(c.per_rank_trainable for c in counts) == whole.per_rank_trainable + copy
    # One MoE layer on each stage (layers 0 and 2), its 2 of 4 experts per GPU.
    assert counts[0].per_rank_trainable_experts == counts[1].per_rank_trainable_experts > 0
    assert counts[0].per_rank_trainable_experts * 2 == whole.per_rank_trainable_experts
    assert all(c.total == whole.total and c.experts == whole.experts for c in counts)
    for shape in shapes:
        holders = [stage.index for stage in stages if stage.holds(shape.name)]
        if shape.name.startswith(("vision_model.", "vision_projection.")):
            assert holders == [0], shape.name
        elif ".output_layer." in shape.name or ".final_layernorm." in shape.name:
            assert holders == [1], shape.name
        elif shape.name == WORD_EMBEDDING:
            assert holders == ([0, 1] if tied else [0])
        else:
            assert len(holders) == 1, shape.name
    assert tied or any(".output_layer." in shape.name for shape in shapes)


def numbered_from(name: str, first_layer: int) -> str:
    """A stage's parameter name with its decoder layer numbered as in the whole model."""
    layer = re.match(r"(language_model\.decoder\.layers\.)(\d+)(.*)", name)
    return f"{layer[1]}{int(layer[2]) + first_layer}{layer[3]}" if layer else name


def test_stage_attribution_matches_the_stages_megatron_core_builds(tiny_shapes):
    """Each stage of a PP=2 model built in this process as megatron-core builds a rank of
    it (parallel_state's pipeline rank and size overrides; untied: a tied last stage
    needs the embedding group of a real pipeline) has exactly the parameters `Stage.holds`
    gives it, its decoder layers numbered from 0. Uneven stages (1 + 3 layers): the MoE
    layer 2 is the last stage's second."""
    from megatron.core import parallel_state

    from megamod.config import ParallelConfig, load_config
    from megamod.data.tokenizer import load_tokenizer
    from megamod.models.build import build_model, with_vocab_size
    from megamod.parallel import world_of_one as one_process
    from megamod.training.plan import pipeline_stages

    config = load_config(TINY_CONFIG, STAGED + PP2 + ["parallel.num_layers_in_first_pipeline_stage=1"])
    config = with_vocab_size(config, TINY_VOCAB_ROWS)
    tokenizer = load_tokenizer(config.data.tokenizer)
    whole = {shape.name: shape.numel for shape in tiny_shapes["untied"]}
    stages = pipeline_stages(config)
    assert [len(stage.layers) for stage in stages] == [1, 3]
    with one_process(ParallelConfig(), config.train.seed, "tests"):
        parallel_state.set_pipeline_model_parallel_world_size(2)
        try:
            for stage in stages:
                parallel_state.set_pipeline_model_parallel_rank(stage.index)
                with torch.device("meta"):
                    model = build_model(config, tokenizer)
                built = {numbered_from(name, stage.layers.start): param.numel()
                         for name, param in model.named_parameters()}
                assert built == {name: n for name, n in whole.items() if stage.holds(name)}
        finally:
            parallel_state.set_pipeline_model_parallel_world_size(None)
            parallel_state.set_pipeline_model_parallel_rank(None)


def test_1f1b_keeps_more_micro_batches_on_earlier_stages():
    from megamod.config import load_config
    from megamod.training.plan import LOCAL, activation_bytes, pipeline_stages, whole_model

    whole_config, config = load_config(TINY_CONFIG, BF16), load_config(TINY_CONFIG, BF16 + PP2)
    whole = activation_bytes(whole_config, TINY_VOCAB_ROWS, LOCAL)
    first, last = pipeline_stages(config)
    head, tail = (activation_bytes(config, TINY_VOCAB_ROWS, LOCAL, stage, micro_batches=4)
                  for stage in (first, last))
    # Stage 0 of 2 runs one warm-up forward: two micro-batches' activations at once.
    assert (head.in_flight, tail.in_flight) == (2, 1)
    assert head.peak == 2 * head.saved and tail.peak == tail.saved + tail.logits_transient
    assert activation_bytes(config, TINY_VOCAB_ROWS, LOCAL, first, micro_batches=1).in_flight == 1
    # One micro-batch's share: the ViT and embedding first, the loss and logits last, the
    # layers split (a stage's output is freed once sent: deallocate_pipeline_outputs).
    assert head.layers + tail.layers == whole.layers
    assert (head.vision, head.embedding, tail.loss, tail.logits_transient) == \
        (whole.vision, whole.embedding, whole.loss, whole.logits_transient)
    assert tail.vision == tail.embedding == head.loss == head.logits_transient == 0
    assert head.decoder == sum(whole.layers[:2])
    assert tail.decoder == sum(whole.layers[2:])
    # PP=1: one micro-batch at a time whatever the accumulation.
    many = activation_bytes(whole_config, TINY_VOCAB_ROWS, LOCAL, whole_model(whole_config), 8)
    assert many.in_flight == 1 and many.peak == whole.peak


def test_block_recompute_starts_at_each_stages_first_layer():
    from megamod.config import load_config
    from megamod.training.plan import activation_bytes, pipeline_stages

    uneven = [*BF16, *MOE, *PP2, "parallel.num_layers_in_first_pipeline_stage=1"]
    plain = activation_bytes(load_config(TINY_CONFIG, BF16 + MOE), TINY_VOCAB_ROWS)
    config = load_config(TINY_CONFIG, uneven + ["train.recompute_granularity=full",
                                                "train.recompute_method=block",
                                                "train.recompute_num_layers=1"])
    _, last = pipeline_stages(config)
    tail = activation_bytes(config, TINY_VOCAB_ROWS, stage=last)
    # The last stage recomputes its own first layer, layer 1 (dense), not the model's
    # first (MoE, larger).
    assert tail.recompute_working_set == plain.layers[1] < plain.layers[0]
    assert tail.decoder < sum(plain.layers[1:])


def test_remedies_double_the_pipeline_only_where_it_splits(tiny_shapes):
    from megamod.config import load_config
    from megamod.training.plan import remedies

    def offers(overrides: list[str], world_size: int) -> list[str]:
        config = load_config(TINY_CONFIG, STAGED + overrides)
        return [text for text, _ in remedies(config, tiny_shapes["untied"], world_size,
                                             TINY_VOCAB_ROWS)]

    assert "raise parallel.pipeline_model_parallel_size to 2" in offers([], 2)
    assert "raise parallel.pipeline_model_parallel_size to 4" in offers(PP2, 8)  # 1 layer a stage
    assert not any("pipeline" in text for text in offers(PP2, 2))  # 2 GPUs, 4 stages
    first_three = PP2 + ["parallel.num_layers_in_first_pipeline_stage=3"]
    assert not any("pipeline" in text for text in offers(first_three, 8))  # 1 layer, 3 stages


# ------------------------------------------------------------------------- TP=2 worker


def worker(out: Path) -> None:
    """On 2 ranks: the TP2 model, this rank's parameters and the
    activations one micro-batch leaves saved."""
    from megamod.config import load_config
    from megamod.parallel import destroy_distributed, init_distributed

    config = load_config(TINY_CONFIG, TP2)
    init_distributed(config.parallel, config.train.seed)
    model, ddp, tokenizer = build(config)
    result = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "saved": saved_activation_bytes(ddp, micro_batch(config, tokenizer)),
    }
    (out / f"rank{torch.distributed.get_rank()}.json").write_text(json.dumps(result))
    destroy_distributed()


def test_per_rank_counts_and_activations_match_a_real_tp2_ep2_run(worker_outputs):
    from megamod.config import load_config
    from megamod.data.tokenizer import load_tokenizer
    from megamod.models.build import vocab_size, with_vocab_size
    from megamod.parallel import parallel_layout
    from megamod.training.plan import LOCAL, activation_bytes, count_parameters, meta_model, parameter_shapes

    # `worker` on 2 ranks, in tests/training/conftest.py's launch.
    ranks = [json.loads((worker_outputs / "plan" / f"rank{r}.json").read_text()) for r in range(2)]
    config = load_config(TINY_CONFIG, TP2)
    tokenizer = load_tokenizer(config.data.tokenizer)
    rows = vocab_size(config, tokenizer.vocab_size)
    with meta_model(with_vocab_size(config, rows), tokenizer) as model:
        shapes = parameter_shapes(model)
    counts = count_parameters(shapes, parallel_layout(config.parallel, 2), config.moe)
    estimate = activation_bytes(config, rows, LOCAL).saved
    for rank in ranks:
        assert (rank["parameters"], rank["trainable"]) == (counts.per_rank, counts.per_rank_trainable)
        assert estimate == pytest.approx(rank["saved"], rel=TOLERANCE)
    assert counts.experts_per_rank == 2 and counts.per_rank < counts.total


# ------------------------------------------------------------------------- the 7B figures


def _plan(overrides: list[str], world_size: int = 8, config: str = "pmod/llava15_7b"):
    from megamod.config import load_config
    from megamod.training.plan import dry_run

    return dry_run(load_config(REPO / f"examples/configs/{config}.yaml", overrides), world_size, 80)


@pytest.fixture(scope="module")
def stand_in(llama_sp_tokenizer, tmp_path_factory) -> list[str]:
    """Overrides that point a real-size config at what exists here (module docstring)."""
    from megamod.data.loader import prepare_tiny_shards

    return [f"data.tokenizer={llama_sp_tokenizer}", f"data.train_shards={prepare_tiny_shards()}",
            "data.mixture=[]", "checkpoint.load=null", "model.language.vocab_size=32000",
            f"checkpoint.save_dir={tmp_path_factory.mktemp('unused') / 'save'}"]


def _vit_l14_336_and_projector() -> int:
    """CLIP ViT-L/14 at 336 px with its last layer not built (feature layer -2), LLaVA's
    2-layer projector into 4096, by hand."""
    h, f, layers = 1024, 4096, 23
    layer = (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h) + 4 * h
    vit = 3 * 14 * 14 * h + h + 577 * h + 2 * h + layers * layer
    return vit + (h * 4096 + 4096) + (4096 * 4096 + 4096)


def test_7b_figures(stand_in):
    from megamod.training.plan import GIB

    dense = ["mod.enabled=false", "parallel.tensor_model_parallel_size=1",
             "parallel.sequence_parallel=false", "train.micro_batch_size=16", "train.global_batch_size=128",
             "parallel.use_distributed_optimizer=true"]
    plan = _plan(stand_in + dense)
    h, f, vocab = 4096, 11008, 32000
    llama_7b = 32 * (4 * h * h + 3 * h * f + 2 * h) + 2 * vocab * h + h
    assert llama_7b == 6_738_415_616  # LLaMA-7B: 13.5 GB in bf16
    assert plan.counts.total - _vit_l14_336_and_projector() == llama_7b
    memory = plan.memory
    assert (memory.weights + memory.gradients + memory.optimizer_replicated) / plan.counts.trainable \
        == pytest.approx(18, abs=0.1)  # frozen ViT weights are the 0.09 more
    # LLaVA-1.5-7B SFT: 16 per GPU at 2048 tokens fits 80 GB with gradient checkpointing
    # (DeepSpeed ZeRO-3 in the official run; here ZeRO-1-like and full fp32 gradients).
    assert memory.total > 80 * GIB
    recomputed = _plan(stand_in + dense + [*FULL, "train.recompute_num_layers=1"])
    assert recomputed.memory.total < 80 * GIB


# ------------------------------------------------------------------------- the dry run


@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_every_real_size_config_fits_at_its_documented_gpu_count(stand_in, name):
    path = REPO / f"examples/configs/{name}.yaml"
    gpus = int(re.search(r"--nproc_per_node=(\d+)", path.read_text()).group(1))
    plan = _plan(stand_in, gpus, name)
    assert plan.fits, (name, plan.memory.total / 2**30)
    assert plan.layout.world_size == gpus and plan.vocab_rows == 32000
    assert not Path(stand_in[-1].split("=", 1)[1]).exists()  # save_dir untouched


# "#   16 GPUs: key=value ... -> 36.7 GiB, TP 2 x DP 8 x 3 ..." in a real-size config's header.
_LAYOUT_LINE = re.compile(r"^#   (\d+) GPUs: (.*?) -> ([\d.]+) GiB, (.*)$", re.MULTILINE)


@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_the_layouts_a_real_size_config_recommends_fit_as_it_says(stand_in, name):
    """Each config names a layout for 8, 16 and 64 GPUs: each is one the run takes (layout,
    batch split), fits 80 GB, and has the size, parallel split and micro-batches per step
    the comment gives."""
    text = (REPO / f"examples/configs/{name}.yaml").read_text()
    layouts = _LAYOUT_LINE.findall(text)
    assert [int(gpus) for gpus, *_ in layouts] == [8, 16, 64]
    for gpus, overrides, gib, split in layouts:
        extra = [] if overrides == "as above" else overrides.split()
        plan = _plan(stand_in + extra, int(gpus), name)
        assert plan.fits and plan.memory.total / 2**30 == pytest.approx(float(gib), abs=0.05), (gpus, split)
        train, layout = plan.config.train, plan.layout
        steps = train.global_batch_size // (train.micro_batch_size * layout.dp)
        assert f"DP {layout.dp} x {steps}" in split, (gpus, split)
        assert (f"PP {layout.pp}" in split) == (layout.pp > 1), (gpus, split)


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    from megamod.__main__ import main

    code = main(["train", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prints_the_plan_and_exits_0(stand_in, capsys):
    config = REPO / "examples/configs/moe_llava/stage3.yaml"
    code, out, err = run_cli(capsys, config, *stand_in, "--dry-run", "--world-size", "8")
    assert code == 0, err
    assert "TP 2 x PP 1 x DP 4, sequence parallel" in out
    assert "EP 4 x expert-TP 1 x expert-DP 2: 1 of 4 experts per GPU" in out
    assert re.search(r"total\s+\d+\.\d\d   of 80: fits", out)
    code, out, _ = run_cli(capsys, config, "--json", *stand_in, "--dry-run", "--world-size", "8")
    report = json.loads(out)
    assert code == 0 and report["fits"] and report["parameters"]["experts_per_rank"] == 1
    assert report["memory_bytes"]["total"] == pytest.approx(sum(
        report["memory_bytes"][key] for key in ("weights", "gradients", "optimizer", "activations", "reserve")))


def test_cli_names_what_to_change_when_it_does_not_fit(stand_in, capsys):
    config = REPO / "examples/configs/moe_llava/stage3.yaml"
    code, out, err = run_cli(capsys, config, *stand_in, "train.recompute_granularity=null",
                             "train.recompute_modules=null", "--dry-run", "--world-size", "8")
    assert code == 2 and "DOES NOT FIT" in out
    assert "exceeds --gpu-memory 80 GiB" in err
    for fix in ("train.recompute_granularity=selective train.recompute_modules=[moe]",
                "lower train.micro_batch_size to 4", "raise parallel.tensor_model_parallel_size to 4"):
        assert fix in err


def test_cli_plans_pipeline_stages(stand_in, capsys):
    config = REPO / "examples/configs/pmod/llava15_7b.yaml"
    # 16 GPUs at TP=2: DP 8 at PP=1, DP 4 at PP=2; 96 rows split over both.
    args = [config, *stand_in, "train.global_batch_size=96", "--dry-run", "--world-size", "16"]
    reports = {}
    for pp in (1, 2):
        code, out, err = run_cli(capsys, *args, f"parallel.pipeline_model_parallel_size={pp}",
                                 "--json")
        assert code == 0, err
        reports[pp] = json.loads(out)
    whole, staged = reports[1], reports[2]
    held = [sum(report["memory_bytes"][key] for key in ("weights", "gradients", "optimizer"))
            for report in (whole, staged)]
    assert held[1] < held[0]
    # Stage 0 holds half the decoder (and the ViT, projector, embedding); the distributed
    # optimizer's share stays: half the parameters over half the DP ranks.
    for key in ("weights", "gradients"):
        assert staged["memory_bytes"][key] < 0.55 * whole["memory_bytes"][key], key
    assert staged["memory_bytes"]["optimizer"] == \
        pytest.approx(whole["memory_bytes"]["optimizer"], rel=0.01)
    assert [stage["decoder_layers"] for stage in staged["stages"]] == [16, 16]
    assert [stage["micro_batches_in_flight"] for stage in staged["stages"]] == [2, 1]  # 6 a step
    assert len(whole["stages"]) == 1 and whole["stages"][0]["micro_batches_in_flight"] == 1
    # Untied embeddings: every parameter on one stage, the output layer on the last.
    assert sum(stage["parameters_per_gpu"] for stage in staged["stages"]) == \
        whole["parameters"]["per_rank"]
    largest = max(staged["stages"], key=lambda stage: stage["total_bytes"])
    assert staged["stage"] == largest["stage"]
    assert staged["memory_bytes"]["total"] == largest["total_bytes"]
    code, out, err = run_cli(capsys, *args, "parallel.pipeline_model_parallel_size=2")
    assert code == 0, err
    assert "16 GPUs = TP 2 x PP 2 x DP 4, sequence parallel" in out
    assert re.search(r"stage 0 +vision encoder, projector, embedding; decoder layers 0-15: "
                     r"[\d,]+ parameters per GPU, 2 micro-batches in flight", out), out
    assert re.search(r"stage 1 +decoder layers 16-31; final norm, output layer, loss: "
                     r"[\d,]+ parameters per GPU, 1 micro-batch in flight", out), out


@pytest.mark.parametrize("overrides, world_size, message", [
    ([], 7, r"7 processes cannot be split into tensor_model_parallel_size=2"),
    (["train.global_batch_size=100"], 8, r"train.global_batch_size=100 must be a multiple"),
    (["data.train_shards=/nonexistent/shards"], 8, r"data.train_shards='/nonexistent/shards' matches no"),
    (["data.tokenizer=/nonexistent/tokenizer"], 8, r"tokenizer '/nonexistent/tokenizer' is neither"),
    (["checkpoint.load=/nonexistent/ckpt"], 8, r"/nonexistent/ckpt does not exist"),
])
def test_cli_refuses_what_the_run_would_refuse(stand_in, capsys, overrides, world_size, message):
    config = REPO / "examples/configs/pmod/llava15_7b.yaml"
    code, _, err = run_cli(capsys, config, *stand_in, *overrides, "--dry-run",
                           "--world-size", world_size)
    assert code == 2 and re.search(message, err), err


def test_checkpoint_compatibility_from_metadata(tmp_path, capsys):
    from megamod.config import load_config
    from megamod.errors import CheckpointError
    from megamod.training.checkpoint import save_checkpoint
    from megamod.training.plan import dry_run

    saved = ["mod.enabled=false", *MOE]
    with world_of_one(saved) as config:
        model, _, _ = build(config)
        save_checkpoint(tmp_path / "ckpt", 1, model, None, None, {}, config)
    load = [f"checkpoint.load={tmp_path / 'ckpt'}", "checkpoint.finetune=true",
            "checkpoint.save_dir=null", "checkpoint.save_interval=null"]
    # A MoD model loads it (its routers start at zero), at TP=2 + SP, EP=2.
    plan = dry_run(load_config(TINY_CONFIG, saved + load + TP2[3:]), 2, 80)
    assert plan.checkpoint["tensors"] > 50 and plan.vocab_rows == 896
    with pytest.raises(CheckpointError, match=r"layers.0.self_attention.linear_qkv.weight is "
                                              r"\(256, 128\) there but \(384, 128\) here"):
        dry_run(load_config(TINY_CONFIG, saved + load + ["model.language.num_query_groups=4"]), 1, 80)
    with pytest.raises(CheckpointError, match=r"moe.num_experts is 4 there but 8 here"):
        dry_run(load_config(TINY_CONFIG, saved + load + ["moe.num_experts=8"]), 1, 80)
    with pytest.raises(CheckpointError, match=r"weights only.*checkpoint.finetune=true"):
        dry_run(load_config(TINY_CONFIG, saved + load + ["checkpoint.finetune=false"]), 1, 80)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
