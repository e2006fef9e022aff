"""Evaluation during training (`eval.interval`): the held-out loss is the model's loss on
the held-out steps, computed independently here, and training is untouched by it: the same
losses step for step with evaluations in between, with MoE-LLaVA's gate, which draws Gumbel
noise at evaluation too (a forgotten random stream would change the next training step),
and with `eval.tasks`' benchmarks answered by the training model, whose scores are those
`megamod eval` gives the checkpoint of the same step. The figures are read back from the
TensorBoard file."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from megamod.config import load_config
from megamod.errors import MegamodError
from tests.eval.conftest import write_benchmark_files
from tests.launcher import REPO, TINY_CONFIG, check, free_port, run, torchrun, world_of_one

BASE = ["checkpoint.save_dir=null", "checkpoint.save_interval=null", "logging.tensorboard_dir=null",
        "moe.num_experts=4", "moe.router_topk=2", "moe.layer_freq=2", "moe.gate=deepspeed_top2",
        "moe.capacity_factor=1.0", "data.prefetch_steps=0"]
EVAL = ["eval.interval=1", "eval.shards=[tiny, tiny]", "eval.iters=2"]
# tests/eval/eval_tasks.py runs `megamod eval` on these files (ROOT/pope.jsonl, ...) with 6 new
# tokens and these batch sizes: the same settings here make the same answers.
TASKS = ("eval.tasks=["
         "{task: pope, questions: pope.jsonl, images: images, max_new_tokens: 6, batch_size: 1}, "
         "{task: scienceqa_img, questions: scienceqa.jsonl, images: images, annotations: [problems.json], "
         "max_new_tokens: 6, batch_size: 2}, "
         "{task: mmbench, questions: mmbench_dev.tsv, max_new_tokens: 6, batch_size: 2}]")
EVAL_TASKS = REPO / "tests" / "eval" / "eval_tasks.py"


@pytest.fixture(scope="module")
def world():
    with world_of_one(BASE):
        yield


def fresh_state(overrides: list[str]):
    from megamod.parallel import seed_everything
    from megamod.training.loop import setup

    config = load_config(TINY_CONFIG, BASE + overrides)
    seed_everything(config.train.seed)
    return setup(config)


def test_training_steps_are_the_same_with_evaluations_between_them(tmp_path):
    """The same 3-step run (MoE and MoD, two data-parallel ranks) twice, as separate
    launches: without evaluation, and with one after every step (two held-out sources, two
    steps each, and three benchmarks whose questions the ranks share)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megamod.eval.during_training import score_tags
    from tests.training.test_checkpoint import step_losses

    write_benchmark_files(tmp_path)

    def train(extra: list[str]) -> str:
        return torchrun(2, ["-m", "megamod", "train", str(TINY_CONFIG), *BASE, "mod.enabled=true",
                            "train.train_iters=3", "logging.log_interval=1", *extra], cwd=tmp_path).stdout

    plain = train([])
    evaluated = train([*EVAL, TASKS, f"logging.tensorboard_dir={tmp_path / 'tb'}",
                       f"checkpoint.save_dir={tmp_path / 'ckpt'}"])
    assert step_losses(evaluated) == step_losses(plain) and len(step_losses(plain)) == 3
    records = [json.loads(line) for line in evaluated.splitlines() if '"eval/loss"' in line]
    assert len(records) == 3 and all(r["eval/loss"] > 0 and "eval/loss/1" in r and "eval/pope/f1" in r
                                     for r in records)
    # Each evaluation reads the same held-out steps: what moves is the model.
    assert records[0]["eval/loss"] != records[2]["eval/loss"]

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])

    def at(tag: str, step: int) -> float:
        return next(e.value for e in events.Scalars(tag) if e.step == step)

    for tag in ("eval/loss", "eval/loss/0", "eval/loss/1", "eval/moe/dropped_fraction", "eval/mod/kept_ratio",
                "eval/mod/kept_ratio/layer1", "eval/pope/f1", "eval/pope/categories/random/yes_ratio",
                "eval/scienceqa_img/accuracy", "eval/mmbench/accuracy", "eval/mmbench/vanilla_accuracy"):
        assert [e.step for e in events.Scalars(tag)] == [1, 2, 3], tag
    # The routing at evaluation, per modality, beside (and not a copy of) the training's.
    for modality in ("image", "text"):
        loads = [t for t in tags if t.startswith(f"eval/moe/expert_load/{modality}/layer")]
        assert len(loads) == 2 * 4  # MoE layers 0 and 2, four experts each
        assert all(t.removeprefix("eval/") in tags for t in loads)
        assert sum(at(t, 3) for t in loads) == pytest.approx(2.0, abs=1e-5)  # shares of each layer's tokens
        assert any(at(t, 3) != at(t.removeprefix("eval/"), 3) for t in loads)

    # After the last step: the scores `megamod eval` gives the checkpoint saved then (one
    # process answering all the questions).
    check(run([sys.executable, str(EVAL_TASKS), str(tmp_path), str(tmp_path / "reference")], cwd=tmp_path,
              extra_env={"MASTER_PORT": str(free_port())}))
    for task in ("pope", "scienceqa_img", "mmbench"):
        report = json.loads((tmp_path / "reference" / f"{task}.scores.json").read_text())
        logged = {t: at(t, 3) for t in tags if t.startswith(f"eval/{task}/")}
        assert logged == pytest.approx(score_tags(report["scores"], f"eval/{task}"), rel=1e-6), task
    assert at("eval/pope/categories/popular/count", 3) == 1  # its second question's image is missing
    assert at("eval/mmbench/count", 3) == 3  # its fourth row's image does not decode


def test_the_held_out_loss_is_the_models_loss_on_the_held_out_steps(world):
    from megatron.core.utils import unwrap_model

    from megamod.data.loader import build_eval_loaders
    from megamod.data.tokenizer import load_tokenizer

    state = fresh_state(["moe.gate=megatron", "eval.interval=1", "eval.shards=[tiny]", "eval.iters=2"])
    llava = unwrap_model(state.model)
    llava.routing_stats.reset()
    scalars = state.validator.evaluate(state.model)
    assert llava.routing_stats.tokens.sum() == 0  # the training statistics were put back
    (loader,) = build_eval_loaders(state.config, load_tokenizer("tiny"), 0, 1)
    loss_sum = loss_tokens = 0.0
    llava.eval()
    with loader, torch.no_grad():
        for _ in range(2):
            for batch in loader.next_step():
                losses = llava(batch["tokens"], batch["images"], batch["labels"], batch["loss_mask"],
                               padding_mask=batch["padding_mask"])
                loss_sum += float((losses * batch["loss_mask"]).sum())
                loss_tokens += float(batch["loss_mask"].sum())
    llava.train()
    assert scalars["eval/loss"] == pytest.approx(loss_sum / loss_tokens, rel=1e-6)

    # eval.tasks without held-out shards: the benchmarks alone, handed the LLaVA in eval mode
    # without gradients, the run's config and tokenizer; training mode comes back after.
    from megamod.training.validation import Validator

    tasks_only = load_config(TINY_CONFIG, BASE + ["eval.interval=1", "eval.tasks=[{task: pope, questions: q.jsonl}]"])
    calls = []

    def benchmarks(model, config, tokenizer) -> dict[str, float]:
        calls.append((model is llava, model.training, torch.is_grad_enabled(), config is tasks_only, tokenizer))
        return {"eval/pope/f1": 0.5}

    tokenizer = load_tokenizer("tiny")
    validator = Validator(tasks_only, tokenizer, benchmarks)
    assert validator.evaluate(state.model) == {"eval/pope/f1": 0.5}
    assert calls == [(True, False, False, True, tokenizer)] and llava.training
    validator.close()
    state.loader.close()
    state.validator.close()


def test_benchmark_files_are_read_before_training_and_named_by_key(tmp_path):
    """`eval.tasks`' files are read as `megamod eval` reads them, before any process group:
    a problem names the entry's key; `limit` takes the first questions of the file."""
    from megamod.eval.during_training import BenchmarkTasks

    write_benchmark_files(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"question_id": 1, "image": "a.png", "text": "?"}\n{"image": 3}\n')
    (tmp_path / "vqa.jsonl").write_text('{"question_id": 1, "image": "chelsea.png", "text": "What?"}\n')

    def read(task: str) -> BenchmarkTasks:
        config = load_config(TINY_CONFIG, ["eval.interval=1", f"eval.tasks=[{task}]"])
        return BenchmarkTasks(config, tmp_path / "scratch")

    images = f"images: {tmp_path / 'images'}"
    refused = {
        f"{{task: pop, questions: {tmp_path / 'pope.jsonl'}, {images}}}": ["eval.tasks[0].task", "pope"],
        f"{{task: pope, questions: {tmp_path / 'nope.jsonl'}, {images}}}": ["eval.tasks[0].questions", "nope.jsonl"],
        f"{{task: pope, questions: {tmp_path / 'pope.jsonl'}, images: {tmp_path / 'pope.jsonl'}}}":
            ["eval.tasks[0].images", "not a folder"],
        f"{{task: pope, questions: {tmp_path / 'bad.jsonl'}, {images}}}": ["eval.tasks[0] (pope)", "bad.jsonl:2"],
        f"{{task: scienceqa_img, questions: {tmp_path / 'scienceqa.jsonl'}, {images}}}":
            ["eval.tasks[0] (scienceqa_img)", "'sqa1'", "answer"],
        f"{{task: vqav2, questions: {tmp_path / 'vqa.jsonl'}, {images}}}": ["eval.tasks[0].annotations", "server"],
        f"{{task: mmbench, questions: {tmp_path / 'mmbench_dev.tsv'}, {images}}}": ["eval.tasks[0].images", "TSV"],
    }
    for task, names in refused.items():
        with pytest.raises(MegamodError) as error:
            read(task)
        assert all(name in str(error.value) for name in names), (task, str(error.value))

    # POPE's first five lines: the fifth's image is missing, so four are asked.
    (pope,) = read(f"{{task: pope, questions: {tmp_path / 'pope.jsonl'}, {images}, limit: 5}}").sets
    assert [q.question_id for q in pope.questions] == [1, 2, 3, 4] and pope.missing_images == 1
    assert [t["label"] for t in pope.truth] == ["yes", "yes", "no", "yes"]
