"""An lmms-eval model: megamod's generator behind lmms-eval's `lmms` interface, so that

    lmms-eval --model megamod --model_args checkpoint=CKPT_DIR[,max_new_tokens=N] --tasks TASKS

runs p-MoD's protocol (lmms-eval's tasks and metrics) on a megamod checkpoint: the model
and tokenizer the checkpoint carries, its conversation template, MoD layers with their
pruned KV cache, MoE layers at `moe.eval_capacity_factor` (`megamod.inference`).

Registered through lmms-eval's entry-point group `lmms_eval.models` (setup.py): lmms-eval
0.7's `ModelRegistryV2.load_entrypoint_manifests` loads `manifest()` below, a
`ModelManifest` naming `MegamodLMM` (`lmms_eval/models/registry_v2.py`); installing
megamod beside lmms-eval (`pip install -e ".[lmms]"`) is all it takes.

`generate_until` answers each request as `megamod eval` does: `<image>` marks placed
first where the context has none (one per visual, as lmms-eval's LLaVA model,
`lmms_eval/models/simple/llava.py` generate_until), greedy unless the task's
`generation_kwargs` ask for a temperature, `max_new_tokens` from them (else the model
argument), the text cut at the first of the task's `until` strings; requests of one
token length and settings batched up to `--batch_size`, each batch numbered and seeded as
`megamod eval` does (`megamod.eval.answer.generate_batch`), so at batch size 1 both give
the same answers. One process (lmms-eval starts the model once; the generator builds a
world of one). `loglikelihood` and
multi-round generation are not implemented: tasks that need them are refused by name.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from megamod.errors import DataError
from megamod.eval.answer import generate_batch, plan_batches
from megamod.inference.generate import open_generator, prompt_tokens

MODEL_ID = "megamod"


def manifest() -> Any:
    """The entry point's payload: lmms-eval's registration of `--model megamod`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.MegamodLMM")


class MegamodLMM(lmms):
    """`--model megamod --model_args checkpoint=CKPT_DIR[,max_new_tokens=N]`; lmms-eval's
    `--batch_size B` batches prompts of equal token length."""

    def __init__(self, checkpoint: str, max_new_tokens: int | str = 128, batch_size: int | str = 1,
                 **unused: Any) -> None:
        super().__init__()
        self._resources = contextlib.ExitStack()
        self.generator = self._resources.enter_context(open_generator(checkpoint))
        scratch = tempfile.TemporaryDirectory(prefix="megamod-lmms-")
        self._scratch = Path(self._resources.enter_context(scratch))
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = int(batch_size)

    def _prompt(self, number: int, context: str, visuals: list) -> tuple[list[int], Any]:
        """Token ids and pixels of one request; its PIL images pass through PNG files so
        that they are read exactly as `megamod eval` reads its images (lossless)."""
        files = []
        for i, visual in enumerate(visuals):
            if not hasattr(visual, "save"):
                raise DataError(f"lmms-eval request {number}: a {type(visual).__name__} visual; "
                                f"the megamod model takes images (PIL), not video or audio")
            files.append(self._scratch / f"{number}-{i}.png")
            visual.save(files[-1])
        try:
            return prompt_tokens(self.generator, context, files)
        finally:
            for file in files:
                file.unlink()

    def generate_until(self, requests: list[Instance]) -> list[str]:
        arguments = [r.args for r in requests]  # (context, gen_kwargs, doc_to_visual, doc_id, task, split)
        encoded = []
        for number, (context, _, doc_to_visual, doc_id, task, split) in enumerate(arguments):
            visuals = [v for v in doc_to_visual(self.task_dict[task][split][doc_id]) if v is not None]
            encoded.append(self._prompt(number, context, visuals))
        # a batch: one length and one set of generation settings
        keys = [(len(ids), repr(sorted(args[1].items()))) for (ids, _), args in zip(encoded, arguments)]
        lengths = [sorted(set(keys)).index(key) for key in keys]
        answers: list[str] = [""] * len(requests)
        for number, batch in enumerate(plan_batches(lengths, self.batch_size)):
            settings = dict(arguments[batch[0]][1])
            sampled = settings.get("do_sample", True)
            temperature = float(settings.get("temperature") or 0.0) if sampled else 0.0
            texts = generate_batch(self.generator, [encoded[i] for i in batch], number,
                                   int(settings.get("max_new_tokens") or self.max_new_tokens), temperature)
            until = settings.get("until") or []
            for i, text in zip(batch, texts):
                for stop in [until] if isinstance(until, str) else until:
                    text = text.split(stop)[0] if stop else text
                answers[i] = text.strip()
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise DataError(f"lmms-eval task {requests[0].task_name!r} scores log-likelihoods, which the "
                        f"megamod model does not compute: run tasks whose output_type is generate_until")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise DataError(f"lmms-eval task {requests[0].task_name!r} is multi-round, which the megamod "
                        f"model does not run: run tasks whose output_type is generate_until")
