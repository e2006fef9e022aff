"""Conversation templates: tokens and shifted labels checked token by token against
sequences built by hand from `tokenizer.encode` of each template's pieces."""

import numpy as np
import pytest

from megamod.data.conversation import IGNORE_INDEX, encode_conversation
from megamod.data.tokenizer import load_tokenizer
from megamod.errors import ConfigError, DataError

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAMA3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)
N_IMG = 3  # image tokens per image in these tests

TWO_ROUNDS = [
    {"from": "human", "value": "<image>\nWhat animal is this?"},
    {"from": "gpt", "value": "It is a cat."},
    {"from": "human", "value": "What colour are its eyes?"},
    {"from": "gpt", "value": "They are green."},
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


def expected(tok, parts, seq_length):
    """parts: ("text", trained) / (id, trained) / ("IMG", False) -> padded tokens, shifted labels, length."""
    ids, trained = [], []
    for part, is_trained in parts:
        new = [tok.image_token_id] * N_IMG if part == "IMG" else [part] if isinstance(part, int) else tok.encode(part)
        ids += new
        trained += [is_trained] * len(new)
    tokens = ids + [tok.pad_id] * (seq_length - len(ids))
    labels = [ids[i + 1] if i + 1 < len(ids) and trained[i + 1] else IGNORE_INDEX for i in range(seq_length)]
    return tokens, labels, len(ids)


def check(sample, tokens, labels, length, num_images):
    assert sample.tokens.dtype == np.int64 and sample.labels.dtype == np.int64
    assert sample.tokens.tolist() == tokens
    assert sample.labels.tolist() == labels
    assert sample.num_images == num_images
    assert not sample.truncated
    assert sample.length == length


def test_plain_two_rounds(tok):
    sample = encode_conversation(TWO_ROUNDS, "plain", tok, N_IMG, 40)
    parts = [
        (tok.bos_id, False), ("IMG", False),
        ("It is a cat.", True), (tok.eos_id, True),
        ("They are green.", True), (tok.eos_id, True),
    ]  # fmt: skip
    check(sample, *expected(tok, parts, 40), num_images=1)
    # The first trained label sits on the last image token: it predicts the caption's first token.
    assert sample.labels[N_IMG] == tok.encode("It")[0] and (sample.labels[:N_IMG] == IGNORE_INDEX).all()


def test_vicuna_v1_two_rounds(tok):
    sample = encode_conversation(TWO_ROUNDS, "vicuna_v1", tok, N_IMG, 96)
    parts = [
        (tok.bos_id, False), (VICUNA_SYSTEM + " USER: ", False), ("IMG", False),
        ("\nWhat animal is this? ASSISTANT:", False), (" It is a cat.", True), (tok.eos_id, True),
        ("USER: What colour are its eyes? ASSISTANT:", False), (" They are green.", True), (tok.eos_id, True),
    ]  # fmt: skip
    check(sample, *expected(tok, parts, 96), num_images=1)
    text = tok.decode(sample.tokens[: sample.length])
    assert text.endswith("ASSISTANT: It is a cat.</s>USER: What colour are its eyes? ASSISTANT: They are green.</s>")


def test_llama3_two_rounds(tok):
    sample = encode_conversation(TWO_ROUNDS, "llama3", tok, N_IMG, 128)

    def header(role):
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n"

    parts = [
        (tok.bos_id, False), (header("system") + LLAMA3_SYSTEM + "<|eot_id|>" + header("user"), False),
        ("IMG", False), ("\nWhat animal is this?<|eot_id|>" + header("assistant"), False),
        ("It is a cat.", True), ("<|eot_id|>", True),
        (header("user") + "What colour are its eyes?<|eot_id|>" + header("assistant"), False),
        ("They are green.", True), ("<|eot_id|>", True),
    ]  # fmt: skip
    check(sample, *expected(tok, parts, 128), num_images=1)


def test_user_assistant_roles_are_aliases(tok):
    aliased = [{"from": {"human": "user", "gpt": "assistant"}[t["from"]], "value": t["value"]} for t in TWO_ROUNDS]
    for template in ("plain", "vicuna_v1", "llama3"):
        a = encode_conversation(TWO_ROUNDS, template, tok, N_IMG, 128)
        b = encode_conversation(aliased, template, tok, N_IMG, 128)
        assert (a.tokens == b.tokens).all() and (a.labels == b.labels).all()


def test_multi_image_runs_stay_in_place(tok):
    turns = [
        {"from": "human", "value": "First <image> then <image>\nSame?"},
        {"from": "gpt", "value": "No."},
    ]
    sample = encode_conversation(turns, "vicuna_v1", tok, N_IMG, 80)
    parts = [
        (tok.bos_id, False), (VICUNA_SYSTEM + " USER: First ", False), ("IMG", False), (" then ", False),
        ("IMG", False), ("\nSame? ASSISTANT:", False), (" No.", True), (tok.eos_id, True),
    ]  # fmt: skip
    check(sample, *expected(tok, parts, 80), num_images=2)
    # plain keeps both images (the human's text is dropped) and trains the answer only.
    plain = encode_conversation(turns, "plain", tok, N_IMG, 20)
    parts = [(tok.bos_id, False), ("IMG", False), ("IMG", False), ("No.", True), (tok.eos_id, True)]
    check(plain, *expected(tok, parts, 20), num_images=2)


def test_text_only(tok):
    turns = [{"from": "human", "value": "What is a galaxy?"}, {"from": "gpt", "value": "A huge group of stars."}]
    sample = encode_conversation(turns, "vicuna_v1", tok, N_IMG, 64)
    parts = [
        (tok.bos_id, False), (VICUNA_SYSTEM + " USER: What is a galaxy? ASSISTANT:", False),
        (" A huge group of stars.", True), (tok.eos_id, True),
    ]  # fmt: skip
    check(sample, *expected(tok, parts, 64), num_images=0)
    assert tok.image_token_id not in sample.tokens


def test_truncation_never_splits_an_image_run(tok):
    turns = [{"from": "human", "value": "<image>\n<image>\n"}, {"from": "gpt", "value": "Two pictures."}]
    full = encode_conversation(turns, "plain", tok, N_IMG, 32)
    assert full.length > 1 + 2 * N_IMG and not full.truncated  # <s>, 2 runs, answer, </s>
    # seq_length 5 ends inside the second run (positions 4..6): it is dropped whole.
    cut = encode_conversation(turns, "plain", tok, N_IMG, 5)
    assert cut.truncated and cut.num_images == 1 and cut.length == 1 + N_IMG
    assert cut.tokens.tolist() == full.tokens[: 1 + N_IMG].tolist() + [tok.pad_id]
    assert (cut.labels == IGNORE_INDEX).all()  # no trained label left: returned anyway
    # Ending exactly after the second run keeps both images.
    edge = encode_conversation(turns, "plain", tok, N_IMG, 1 + 2 * N_IMG)
    assert edge.truncated and edge.num_images == 2 and edge.length == 1 + 2 * N_IMG


def test_truncation_inside_an_answer(tok):
    full = encode_conversation(TWO_ROUNDS, "vicuna_v1", tok, N_IMG, 96)
    n = full.length - 4
    cut = encode_conversation(TWO_ROUNDS, "vicuna_v1", tok, N_IMG, n)
    assert cut.truncated and cut.num_images == 1 and cut.length == n
    assert (cut.tokens == full.tokens[:n]).all()
    # The last kept position has no next token to predict; all earlier labels are unchanged.
    assert (cut.labels[: n - 1] == full.labels[: n - 1]).all() and cut.labels[n - 1] == IGNORE_INDEX


def test_unknown_role_and_template(tok):
    with pytest.raises(DataError, match="'system'.*'from'"):
        encode_conversation([{"from": "system", "value": "hi"}], "vicuna_v1", tok, N_IMG, 32)
    with pytest.raises(DataError, match="turn 0"):
        encode_conversation([{"value": "hi"}], "vicuna_v1", tok, N_IMG, 32)
    with pytest.raises(ConfigError, match="vicuna_v2.*plain, vicuna_v1, llama3"):
        encode_conversation(TWO_ROUNDS, "vicuna_v2", tok, N_IMG, 32)
