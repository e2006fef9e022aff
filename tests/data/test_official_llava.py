"""megamod's `plain` and `vicuna_v1` templates against the official LLaVA code, token for token.

The reference is llava-torch==1.2.2.post1 run unmodified under the transformers 4.36.2 it
pins (`official_llava` fixture, tests/conftest.py), in one subprocess (tests/data/
llava_reference.py): tokenizer loaded as `llava/train/train.py` loads Vicuna's (slow
SentencePiece `LlamaTokenizer`, `use_fast=False`, `legacy: false` from the config), then
`preprocess_multimodal` -> `preprocess` (-> `preprocess_plain` / `preprocess_v1`) ->
`DataCollatorForSupervisedDataset` -> `prepare_inputs_labels_for_multimodal` (image
expansion, truncation). megamod runs in this process with its own tokenizer path
(transformers 5's converted fast tokenizer).

Conventions: the official input has IMAGE_TOKEN_INDEX (-200) per image position after
expansion, megamod the tokenizer's `<image>` id; official labels are unshifted
(`labels[i]` is `input_ids[i]` or -100), megamod's shifted (`labels[i]` is the target at
position i, i.e. official `labels[i + 1]`).

Two Vicuna-style tokenizers (tests/sp_tokenizer.py): in `llama_split`, "USER" after "</s>"
is one token fewer than "▁USER" at a text's start, which `preprocess_v1`'s round-length
correction for non-legacy tokenizers assumes (as of the Vicuna vocabulary it was written
for); with it the official labels of multi-turn samples are right and megamod's equal them.
The plain one lacks it: there the official code prints "tokenization mismatch" and masks
every label of a multi-turn sample, while megamod trains the answers (the documented
deviation).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megamod.data.conversation import IGNORE_INDEX, encode_conversation, encode_prompt
from megamod.data.tiny import tiny_samples, tokenizer_corpus
from megamod.data.tokenizer import IMAGE_TOKEN, load_tokenizer
from tests.sp_tokenizer import build_llama_sp_tokenizer

REFERENCE_SCRIPT = Path(__file__).with_name("llava_reference.py")
N_IMG = 4
MAX_LEN = 4096  # vicuna-7b-v1.5's model_max_length: nothing here is truncated
IMAGE_TOKEN_INDEX = -200
OFFICIAL_TEMPLATE = {"plain": "plain", "vicuna_v1": "v1"}  # --version as LLaVA-1.5's scripts give it


def _turns(*values: str) -> list[dict]:
    return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


def _has_image(turns: list[dict]) -> bool:
    return any(IMAGE_TOKEN in t["value"] for t in turns)


# Single images anywhere, multi-turn, text-only, odd whitespace, a caption with a leading space.
HAND_WRITTEN = [
    _turns("<image>\nWhat animal is this?", "It is a cat."),
    _turns("What is in this picture?\n<image>", "A cup of espresso."),
    _turns("  Look: <image> what is it?  ", "A rocket."),
    _turns("<image>\nWhat animal is this?", "It is a cat.", "What colour are its eyes?", "They are green."),
    _turns("Describe it.\n<image>", "A cat.", "Is it happy?", "Yes.", "And the eyes?", "Green, and wide open."),
    _turns("What is a galaxy?", "A huge group of stars."),
    _turns("What is a galaxy?", "A huge group of stars.", " Name one ", "  The Milky Way.  "),
]
PLAIN_HAND_WRITTEN = [
    _turns("<image>\nDescribe the image briefly.", "A cat on a mat."),
    _turns("Give a caption.\n<image>", " A caption with a leading space."),
    _turns("<image>", "Two lines:\nthe second one."),
]


def _tiny_cases() -> tuple[list[list[dict]], list[list[dict]]]:
    """Every tiny sample LLaVA-1.5 can train (one image or none): for vicuna_v1, and the
    single-turn single-image ones for plain (`preprocess_plain` asserts that shape)."""
    v1, plain = [], []
    for sample in tiny_samples():
        turns = sample["conversations"]
        images = sum(t["value"].count(IMAGE_TOKEN) for t in turns)
        if images <= 1:
            v1.append(turns)
        if images == 1 and len(turns) == 2 and IMAGE_TOKEN in turns[0]["value"]:
            plain.append(turns)
    return v1, plain


TINY_V1, TINY_PLAIN = _tiny_cases()
V1_CASES = HAND_WRITTEN + TINY_V1
PLAIN_CASES = PLAIN_HAND_WRITTEN + TINY_PLAIN
QUESTIONS = ["What is shown?", "Describe the image in detail.", "Is there a cat?\nAnswer yes or no."]
LONG = HAND_WRITTEN[4]  # truncated at several lengths below


def _texts() -> list[str]:
    texts = []
    for t in tokenizer_corpus():
        t = t.replace(IMAGE_TOKEN, "")
        texts += [t, " " + t, "  " + t, "\n" + t, t + " ", t.replace(" ", "  ")]
    return texts + ["x </s> y", "a</s>USER: hi", " </s> ", "Zebras 42°C! ünï 中文 🙂", "\t tab", " ", ""]


def _train_case(template: str, turns: list[dict]) -> dict:
    return {"kind": "train", "template": OFFICIAL_TEMPLATE[template], "has_image": _has_image(turns),
            "conversations": turns}  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer_dirs(llama_sp_tokenizer, tmp_path_factory) -> dict[str, Path]:
    split = build_llama_sp_tokenizer(tmp_path_factory.mktemp("llama_split_tokenizer"), llama_user_split=True)
    return {"plain_vocab": llama_sp_tokenizer, "llama_split": split}


@pytest.fixture(scope="module")
def truncation_lengths(tokenizer_dirs) -> list[int]:
    """Lengths that cut LONG after its image: inside an answer, on an `</s>`, in a question."""
    full = encode_conversation(LONG, "vicuna_v1", load_tokenizer(str(tokenizer_dirs["llama_split"])), N_IMG, MAX_LEN)
    return [full.length - 1, full.length - 3, full.length - 9, full.length - 15]


@pytest.fixture(scope="module")
def official(official_llava, tokenizer_dirs, truncation_lengths) -> dict:
    """The official outputs: {tokenizer name: {"full": run, "truncated": [runs]}}."""
    runs, names = [], []
    for name, folder in tokenizer_dirs.items():
        cases = [_train_case("vicuna_v1", t) for t in V1_CASES] + [_train_case("plain", t) for t in PLAIN_CASES]
        cases += [{"kind": "prompt", "template": "vicuna_v1", "question": q} for q in QUESTIONS]
        runs.append({"tokenizer": str(folder), "model_max_length": MAX_LEN, "num_image_tokens": N_IMG,
                     "cases": cases, "texts": _texts()})  # fmt: skip
        names.append((name, "full"))
        for length in truncation_lengths:
            runs.append({"tokenizer": str(folder), "model_max_length": length, "num_image_tokens": N_IMG,
                         "cases": [_train_case("vicuna_v1", LONG), _train_case("vicuna_v1", HAND_WRITTEN[6])]})  # fmt: skip
            names.append((name, "truncated"))
    env = {**os.environ, "PYTHONPATH": str(official_llava), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(REFERENCE_SCRIPT)], input=json.dumps({"runs": runs}), capture_output=True,
        text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    reply = json.loads(result.stdout)
    assert reply["transformers"] == "4.36.2"
    out: dict = {name: {"truncated": []} for name in tokenizer_dirs}
    for (name, kind), run in zip(names, reply["runs"]):
        if kind == "full":
            out[name]["full"] = run
        else:
            out[name]["truncated"].append(run)
    return out


def _official_tokens(ids: list[int], tok) -> list[int]:
    return [tok.image_token_id if i == IMAGE_TOKEN_INDEX else i for i in ids]


def _assert_same(sample, ref: dict, tok, check_labels: bool = True) -> None:
    n = sample.length
    assert sample.tokens[:n].tolist() == _official_tokens(ref["input_ids"], tok)
    assert (sample.tokens[n:] == tok.pad_id).all()
    if check_labels:
        assert sample.labels[: n - 1].tolist() == ref["labels"][1:]
        assert (sample.labels[n - 1 :] == IGNORE_INDEX).all()


@pytest.mark.parametrize("name", ["plain_vocab", "llama_split"])
def test_texts_tokenize_as_the_slow_tokenizer(official, tokenizer_dirs, name):
    tok = load_tokenizer(str(tokenizer_dirs[name]))
    texts = _texts()
    if name == "llama_split":
        # "USER" is a user-defined piece of this model only (not of Vicuna's): transformers
        # 5 makes it an added token, which loses SentencePiece's "▁" before it at the very
        # start of a text. No chunk LLaVA tokenizes starts with it.
        texts = [t for t in texts if not t.lstrip(" ").startswith("USER")]
    ref = dict(zip(_texts(), official[name]["full"]["texts"]))
    assert official[name]["full"]["legacy"] is False
    for text in texts:
        assert tok.encode(text) == ref[text], repr(text)


@pytest.mark.parametrize("name", ["plain_vocab", "llama_split"])
def test_plain_matches_official(official, tokenizer_dirs, name):
    tok = load_tokenizer(str(tokenizer_dirs[name]))
    refs = official[name]["full"]["cases"][len(V1_CASES) : len(V1_CASES) + len(PLAIN_CASES)]
    for turns, ref in zip(PLAIN_CASES, refs):
        assert not ref["mismatch"]
        _assert_same(encode_conversation(turns, "plain", tok, N_IMG, MAX_LEN), ref, tok)


def test_vicuna_v1_matches_official(official, tokenizer_dirs):
    tok = load_tokenizer(str(tokenizer_dirs["llama_split"]))
    for turns, ref in zip(V1_CASES, official["llama_split"]["full"]["cases"]):
        assert not ref["mismatch"], turns
        assert any(label != IGNORE_INDEX for label in ref["labels"])
        _assert_same(encode_conversation(turns, "vicuna_v1", tok, N_IMG, MAX_LEN), ref, tok)


def test_vicuna_v1_where_official_round_lengths_do_not_fit(official, tokenizer_dirs):
    """Without the "USER" split the official code drops multi-turn samples' labels
    ("tokenization mismatch"); single-turn ones match exactly. megamod trains each answer
    and its </s> either way."""
    tok = load_tokenizer(str(tokenizer_dirs["plain_vocab"]))
    for turns, ref in zip(V1_CASES, official["plain_vocab"]["full"]["cases"]):
        sample = encode_conversation(turns, "vicuna_v1", tok, N_IMG, MAX_LEN)
        rounds = len(turns) // 2
        assert ref["mismatch"] == (rounds > 1), turns
        _assert_same(sample, ref, tok, check_labels=rounds == 1)
        if rounds > 1:
            assert all(label == IGNORE_INDEX for label in ref["labels"])
            trained = sample.labels[: sample.length] != IGNORE_INDEX
            runs = np.split(sample.labels[: sample.length], np.flatnonzero(np.diff(trained)) + 1)
            answers = [tok.decode(r.tolist()) for r in runs if r[0] != IGNORE_INDEX]
            assert [a.strip() for a in answers] == [(t["value"] + "</s>").strip() for t in turns[1::2]]


@pytest.mark.parametrize("name", ["plain_vocab", "llama_split"])
def test_eval_prompt_matches_model_vqa_loader(official, tokenizer_dirs, name):
    tok = load_tokenizer(str(tokenizer_dirs[name]))
    refs = official[name]["full"]["cases"][len(V1_CASES) + len(PLAIN_CASES) :]
    for question, ref in zip(QUESTIONS, refs):
        ids = encode_prompt([{"from": "human", "value": IMAGE_TOKEN + "\n" + question}], "vicuna_v1", tok, 1)
        assert ids == _official_tokens(ref["input_ids"], tok)
        assert tok.decode(ids).endswith(question + " ASSISTANT:")


def test_truncation_matches_official(official, tokenizer_dirs, truncation_lengths):
    tok = load_tokenizer(str(tokenizer_dirs["llama_split"]))
    for length, run in zip(truncation_lengths, official["llama_split"]["truncated"]):
        for turns, ref in zip([LONG, HAND_WRITTEN[6]], run["cases"]):
            sample = encode_conversation(turns, "vicuna_v1", tok, N_IMG, length)
            full = encode_conversation(turns, "vicuna_v1", tok, N_IMG, MAX_LEN)
            assert sample.truncated == (full.length > length)
            assert len(ref["input_ids"]) == sample.length == min(length, full.length)
            _assert_same(sample, ref, tok)
