"""Config loading: YAML + dotted overrides, type checks, and the CLI's exit code 2."""

from __future__ import annotations

import sys

import pytest

from megamod.config import Config, load_config
from megamod.errors import ConfigError
from tests.launcher import REPO, TINY_CONFIG, run


def test_tiny_config_with_overrides():
    config = load_config(TINY_CONFIG, ["train.lr=1e-3", "parallel.tensor_model_parallel_size=2",
                                       "parallel.sequence_parallel=true", "train.trainable=[projector]"])
    assert config.train.lr == 1e-3 and isinstance(config.train.lr, float)
    assert config.parallel.tensor_model_parallel_size == 2 and config.parallel.sequence_parallel
    assert config.train.trainable == ["projector"]
    assert config.model.vision.num_patches == 16
    assert config.model.vision.num_built_layers == 2  # feature layer -2 of 3


def test_defaults_are_llava_shapes():
    config = Config()
    assert config.model.vision.num_patches == 576  # CLIP-L/14 at 336 px
    assert config.model.vision.num_built_layers == 23


POPE = "{task: pope, questions: q.jsonl, images: images}"
POPE_TASK = f"[{POPE}]"


@pytest.mark.parametrize(
    "overrides, names",
    [
        (["train.lrr=1"], ["train.lrr", "train.lr"]),  # unknown key, with a suggestion
        (["train.lr=fast"], ["train.lr", "float"]),
        (["train.train_iters=1.5"], ["train.train_iters", "int"]),
        (["parallel.sequence_parallel=maybe"], ["parallel.sequence_parallel", "bool"]),
        (["model.language.normalization=BatchNorm"], ["model.language.normalization", "RMSNorm"]),
        (["parallel.tensor_model_parallel_size=3"], ["num_attention_heads", "tensor_model_parallel_size"]),
        (["parallel.sequence_parallel=true"], ["parallel.sequence_parallel", "tensor_model_parallel_size"]),
        (["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
          "model.language.seq_length=127"], ["model.language.seq_length", "tensor_model_parallel_size"]),
        (["model.vision.patch_size=15"], ["model.vision.image_size", "model.vision.patch_size"]),
        (["train.trainable=[vision,decoder]"], ["train.trainable", "decoder"]),
        (["train.global_batch_size=6", "train.micro_batch_size=4"], ["train.global_batch_size"]),
        (["model.language.num_query_groups=3"], ["model.language.num_query_groups"]),
        (["checkpoint.save_dir=null"], ["checkpoint.save_interval", "checkpoint.save_dir"]),
        (["model=3"], ["model", "mapping"]),
        (["train.lr"], ["train.lr", "key.sub=value"]),
        (["moe.num_experts=4", "parallel.expert_model_parallel_size=3"],
         ["moe.num_experts=4", "expert_model_parallel_size=3"]),
        (["moe.num_experts=4", "parallel.tensor_model_parallel_size=2"],
         ["sequence_parallel", "tensor_model_parallel_size"]),
        (["moe.num_experts=4", "moe.router_topk=5"], ["moe.router_topk", "moe.num_experts"]),
        (["moe.num_experts=4", "moe.layer_freq=[1,0]"], ["moe.layer_freq", "num_layers=4"]),
        (["moe.num_experts=4", "moe.layer_freq=[1,0,2,0]"], ["moe.layer_freq", "0 or 1"]),
        (["moe.num_experts=4", "moe.pad_expert_input_to_capacity=true"],
         ["moe.pad_expert_input_to_capacity", "moe.capacity_factor"]),
        (["moe.num_experts=4", "moe.capacity_factor=0"], ["moe.capacity_factor"]),
        (["moe.num_experts=4", "moe.token_dispatcher_type=flex"], ["moe.token_dispatcher_type"]),
        (["parallel.expert_model_parallel_size=2"], ["expert_model_parallel_size", "moe.num_experts"]),
        (["train.trainable=[moe]"], ["train.trainable", "moe.num_experts"]),
        (["mod.enabled=true", "mod.weight_norm=tanh_x_1"], ["mod.weight_norm", "tanh_0.2_1"]),
        (["mod.enabled=true", "mod.layers=sometimes"], ["mod.layers", "interleave"]),
        (["mod.enabled=true", "mod.schedule=fixed", "mod.layers=[1,7]"], ["mod.layers", "0..3"]),
        (["mod.ratio=0"], ["mod.ratio"]),
        (["mod.candidates=text"], ["mod.candidates", "vision"]),
        # Each of these ended in a traceback once (issue: bad input never does).
        (["train.lr=1e-5", "train.min_lr=1e-4"], ["train.lr", "train.min_lr"]),
        (["train.train_iters=0"], ["train.train_iters", ">= 1"]),
        (["train.lr=-1e-3", "train.min_lr=-1e-2"], ["train.lr=-0.001", ">= 0"]),
        (["train.lr=.nan"], ["train.lr=nan", "finite"]),
        (["train.adam_beta1=1.5"], ["train.adam_beta1=1.5", "[0, 1)"]),
        (["train.adam_eps=0"], ["train.adam_eps", "> 0"]),
        (["train.clip_grad=-1"], ["train.clip_grad", ">= 0"]),
        (["train.micro_batch_size=0"], ["train.micro_batch_size", ">= 1"]),
        (["model.vision.patch_size=0"], ["model.vision.patch_size", ">= 1"]),
        (["model.language.num_attention_heads=0"], ["model.language.num_attention_heads"]),
        (["logging.log_interval=0"], ["logging.log_interval", ">= 1"]),
        (["model.vision.hidden_size=65"], ["model.vision.hidden_size", "num_attention_heads"]),
        (["parallel.tensor_model_parallel_size=2", "model.language.ffn_hidden_size=351"],
         ["model.language.ffn_hidden_size=351", "tensor_model_parallel_size=2"]),
        (["parallel.tensor_model_parallel_size=2", "model.language.vocab_size=1001"],
         ["model.language.vocab_size=1001"]),
        ([f"checkpoint.save_dir={TINY_CONFIG}"], ["checkpoint.save_dir", "is a file"]),
        ([f"logging.tensorboard_dir={TINY_CONFIG}"], ["logging.tensorboard_dir", "is a file"]),
        ([f"checkpoint.load={TINY_CONFIG}"], ["checkpoint.load", "is a file"]),
        (["mod.enabled=true", "parallel.tensor_model_parallel_size=2",
          "parallel.sequence_parallel=true", "mod.kept_length_multiple=3"],
         ["mod.kept_length_multiple", "tensor_model_parallel_size=2"]),
        # pipeline
        (["parallel.num_layers_in_first_pipeline_stage=1"],
         ["num_layers_in_first_pipeline_stage=1", "pipeline_model_parallel_size > 1"]),
        (["parallel.pipeline_model_parallel_size=3"],
         ["num_layers=4", "pipeline_model_parallel_size=3", "evenly"]),
        (["parallel.pipeline_model_parallel_size=2", "parallel.num_layers_in_first_pipeline_stage=5"],
         ["num_layers=4", "num_layers_in_first_pipeline_stage=5"]),
        (["parallel.pipeline_model_parallel_size=4", "parallel.num_layers_in_first_pipeline_stage=1",
          "parallel.num_layers_in_last_pipeline_stage=3"], ["leaves no decoder layer"]),
        (["parallel.pipeline_model_parallel_size=2", "train.recompute_granularity=full",
          "train.recompute_method=uniform", "train.recompute_num_layers=4"],
         ["recompute_num_layers=4", "[2, 2]"]),
        (["parallel.pipeline_model_parallel_size=2", "moe.num_experts=4",
          "moe.token_dispatcher_type=allgather"], ["allgather", "alltoall"]),
        # precision
        (["precision.params_dtype=fp8"], ["precision.params_dtype", "bf16"]),
        (["precision.min_loss_scale=0"], ["precision.min_loss_scale", "> 0"]),
        (["precision.initial_loss_scale=4", "precision.min_loss_scale=8"],
         ["precision.min_loss_scale=8", "precision.initial_loss_scale=4"]),
        (["precision.hysteresis=0"], ["precision.hysteresis", ">= 1"]),
        (["precision.loss_scale_window=0"], ["precision.loss_scale_window", ">= 1"]),
        (["precision.loss_scale=128"], ["precision.loss_scale", "fp16"]),
        (["precision.params_dtype=fp16", "precision.loss_scale=-1"], ["precision.loss_scale", "> 0"]),
        (["precision.fp8=e5m2"], ["precision.fp8", "hybrid"]),
        (["precision.fp8_recipe=custom"], ["precision.fp8_recipe", "delayed"]),
        (["precision.fp8_amax_compute_algo=mean"], ["precision.fp8_amax_compute_algo", "most_recent"]),
        (["precision.fp8_amax_history_len=0"], ["precision.fp8_amax_history_len", ">= 1"]),
        # stability
        (["stability.on_nonfinite=ignore"], ["stability.on_nonfinite", "skip"]),
        (["stability.spike_zscore=0"], ["stability.spike_zscore", "> 0"]),
        (["stability.spike_window=1"], ["stability.spike_window", ">= 2"]),
        (["stability.on_spike=stop"], ["stability.on_spike", "log"]),
        (["stability.max_consecutive_skips=0"], ["stability.max_consecutive_skips", "null"]),
        (["stability.skip_batches_on_rollback=-1"], ["stability.skip_batches_on_rollback", ">= 0"]),
        (["stability.max_rollbacks=-1"], ["stability.max_rollbacks", ">= 0"]),
        (["stability.inject_nan_at=[1,x]"], ["stability.inject_nan_at[1]", "int"]),
        # evaluation during training
        (["eval.interval=1"], ["eval.interval", "eval.shards", "eval.tasks"]),
        (["eval.interval=0", "eval.shards=[tiny]"], ["eval.interval=0", ">= 1"]),
        ([f"eval.tasks={POPE_TASK}"], ["eval.tasks", "eval.interval is null"]),
        (["eval.interval=1", "eval.tasks=[{task: pope}]"], ["eval.tasks[0].questions", "empty"]),
        (["eval.interval=1", f"eval.tasks=[{POPE}, {POPE}]"], ["eval.tasks[1].task='pope'", "eval.tasks[0]"]),
        (["eval.interval=1", "eval.tasks=[{task: pope, questions: q.jsonl, batch_size: 0}]"],
         ["eval.tasks[0].batch_size=0", ">= 1"]),
        (["eval.interval=1", "eval.tasks=[{task: pope, questions: q.jsonl, limit: 0}]"],
         ["eval.tasks[0].limit=0", ">= 1"]),
        (["eval.interval=1", "eval.tasks=[{task: pope, question: q.jsonl}]"],
         ["eval.tasks[0].question", "eval.tasks[0].questions"]),
        # the generator needs the whole model on every rank
        (["eval.interval=1", f"eval.tasks={POPE_TASK}", "parallel.tensor_model_parallel_size=2"],
         ["eval.tasks", "parallel.tensor_model_parallel_size=2", "megamod eval"]),
        (["eval.interval=1", f"eval.tasks={POPE_TASK}", "parallel.pipeline_model_parallel_size=2"],
         ["eval.tasks", "parallel.pipeline_model_parallel_size=2"]),
        (["eval.interval=1", f"eval.tasks={POPE_TASK}", "moe.num_experts=4",
          "parallel.expert_model_parallel_size=2"], ["eval.tasks", "parallel.expert_model_parallel_size=2"]),
    ],
)
def test_bad_config_names_the_key(overrides, names):
    with pytest.raises(ConfigError) as error:
        load_config(TINY_CONFIG, overrides)
    for name in names:
        assert name in str(error.value)


def test_cli_exits_2_naming_the_key(tmp_path):
    cases = {
        "train.lrr=1": "train.lrr",
        "parallel.tensor_model_parallel_size=3": "tensor_model_parallel_size",
        "parallel.sequence_parallel=true": "parallel.sequence_parallel",
    }
    for override, name in cases.items():
        result = run([sys.executable, "-m", "megamod", "train", str(TINY_CONFIG), override], cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert name in result.stderr and "Traceback" not in result.stderr
    missing = run([sys.executable, "-m", "megamod", "train", str(tmp_path / "nope.yaml")], cwd=tmp_path)
    assert missing.returncode == 2 and "nope.yaml" in missing.stderr


def test_eval_tasks_load():
    config = load_config(TINY_CONFIG, ["eval.interval=5", f"eval.tasks={POPE_TASK}"])  # no held-out shards
    (task,) = config.eval.tasks
    assert (task.task, task.questions, task.images, task.annotations) == ("pope", "q.jsonl", "images", [])
    assert (task.max_new_tokens, task.batch_size, task.limit) == (128, 8, None)  # megamod eval's defaults


def test_cli_exits_2_naming_the_eval_task_file(tmp_path):
    """Before any process group: a question file that is not there."""
    result = run([sys.executable, "-m", "megamod", "train", str(TINY_CONFIG), "eval.interval=1",
                  f"eval.tasks=[{{task: pope, questions: nope.jsonl, images: {tmp_path}}}]"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "eval.tasks[0].questions=nope.jsonl" in result.stderr and "Traceback" not in result.stderr


def test_cli_exits_2_when_processes_do_not_split(tmp_path):
    """A layout that only the process count rules out fails after launch, still with 2."""
    result = run([sys.executable, "-m", "megamod", "train", str(TINY_CONFIG),
                  "parallel.tensor_model_parallel_size=2"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "tensor_model_parallel_size=2" in result.stderr


@pytest.mark.parametrize("overrides,stages", [
    ([], [4]),
    (["parallel.pipeline_model_parallel_size=2"], [2, 2]),
    (["parallel.pipeline_model_parallel_size=2", "parallel.num_layers_in_first_pipeline_stage=1"], [1, 3]),
    (["parallel.pipeline_model_parallel_size=3", "parallel.num_layers_in_first_pipeline_stage=2"], [2, 1, 1]),
    (["parallel.pipeline_model_parallel_size=3", "parallel.num_layers_in_first_pipeline_stage=1",
      "parallel.num_layers_in_last_pipeline_stage=1"], [1, 2, 1]),
])
def test_decoder_layers_per_pipeline_stage(overrides, stages):
    """As megatron-core's `get_num_layers_to_build` splits them (the tiny decoder: 4 layers)."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    from megamod.models.transformer_configs import transformer_configs

    config = load_config(TINY_CONFIG, overrides)
    assert config.pipeline_stage_layers() == stages
    language = transformer_configs(config, on_gpu=False).language
    assert [get_num_layers_to_build(language, pp_rank=rank) for rank in range(len(stages))] == stages


def test_moe_layer_freq_takes_an_int_or_a_list():
    every_other = load_config(TINY_CONFIG, ["moe.num_experts=4", "moe.layer_freq=2"])
    assert every_other.moe.layer_pattern(4) == [1, 0, 1, 0]
    listed = load_config(TINY_CONFIG, ["moe.num_experts=4", "moe.layer_freq=[0,1,1,0]"])
    assert listed.moe.layer_pattern(4) == [0, 1, 1, 0]
    assert load_config(TINY_CONFIG).moe.layer_pattern(4) == [0, 0, 0, 0]  # dense


def test_base_file_is_overridden_key_by_key(tmp_path):
    (tmp_path / "base.yaml").write_text(f"base: {TINY_CONFIG}\ntrain: {{lr: 0.5, train_iters: 7}}\n")
    (tmp_path / "stage.yaml").write_text("base: base.yaml\ntrain: {lr: 0.25}\nmoe: {num_experts: 4}\n")
    config = load_config(tmp_path / "stage.yaml", ["train.seed=3"])
    assert (config.train.lr, config.train.train_iters, config.train.seed) == (0.25, 7, 3)
    assert config.model.language.num_layers == 4 and config.moe.num_experts == 4  # from tiny
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="its own base"):
        load_config(tmp_path / "loop.yaml")


def test_moe_llava_recipe_configs_load():
    stages = [load_config(REPO / "examples/configs/moe_llava" / f"{name}.yaml")
              for name in ("stage1", "stage2", "stage3")]
    assert [s.train.trainable for s in stages] == [
        ["projector"], ["projector", "language"], ["ffn", "router", "projector"]]
    assert [s.train.lr for s in stages] == [1e-3, 2e-5, 2e-5]
    moe = stages[2].moe
    assert (moe.num_experts, moe.router_topk, moe.layer_freq, moe.capacity_factor) == (4, 2, 2, 1.5)
    assert moe.aux_loss_coeff == 0.01 and stages[0].moe.num_experts is None
    assert (moe.gate, moe.eval_capacity_factor) == ("deepspeed_top2", 2.0)


def test_pmod_configs_load_with_the_papers_schedule():
    from megamod.mod.schedule import layer_ratios

    real = load_config(REPO / "examples/configs/pmod/llava15_7b.yaml")
    ratios = layer_ratios(real.mod, real.model.language.num_layers)
    assert ratios[:8] == [None] * 8 and ratios[8] == pytest.approx(0.8444, abs=1e-4)
    assert ratios[-8:] == [0.15] * 8  # p-MoD: MoD on layers 8..31, 0.844 ... 0.15
    with_moe = load_config(REPO / "examples/configs/pmod/llava15_7b_moe.yaml")
    assert with_moe.mod.enabled and with_moe.moe.num_experts == 4
    for tiny in ("tiny", "tiny_moe"):
        config = load_config(REPO / f"examples/configs/pmod/{tiny}.yaml")
        assert layer_ratios(config.mod, 4) == [None, 0.75, pytest.approx(0.25), 0.15]


def test_a_config_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("train: {lr: 1.0e-3}  # d\xe9j\xe0 vu\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.yaml is not UTF-8"):
        load_config(path)
