"""Conversation templates: tokens and shifted labels checked token by token against
sequences built by hand from `tokenizer.encode` of each template's pieces (the tiny
byte-level tokenizer tokenizes these pieces as it tokenizes the whole prompt). The official
LLaVA code is the reference in test_official_llava.py."""

import numpy as np
import pytest

from megamod.data.conversation import IGNORE_INDEX, encode_conversation, encode_prompt
from megamod.data.tokenizer import load_tokenizer
from megamod.errors import ConfigError, DataError

# llava/conversation.py, conv_vicuna_v1.system
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
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


def test_plain_caption(tok):
    # preprocess_plain: <image> + caption + "\n" (conv_llava_plain.sep), the question dropped,
    # no </s>; the caption and the "\n" take loss.
    turns = [{"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "It is a cat."}]
    sample = encode_conversation(turns, "plain", tok, N_IMG, 40)
    parts = [(tok.bos_id, False), ("IMG", False), ("It is a cat.\n", True)]
    check(sample, *expected(tok, parts, 40), num_images=1)
    # The first trained label sits on the last image token: it predicts the caption's first token.
    assert sample.labels[N_IMG] == tok.encode("It")[0] and (sample.labels[:N_IMG] == IGNORE_INDEX).all()
    assert tok.eos_id not in sample.tokens[: sample.length]


def test_plain_two_rounds(tok):
    # Beyond LLaVA (one round only): each answer + "\n" trained, human turns give their images.
    sample = encode_conversation(TWO_ROUNDS, "plain", tok, N_IMG, 40)
    parts = [(tok.bos_id, False), ("IMG", False), ("It is a cat.\n", True), ("They are green.\n", True)]
    check(sample, *expected(tok, parts, 40), num_images=1)


def test_vicuna_v1_two_rounds(tok):
    sample = encode_conversation(TWO_ROUNDS, "vicuna_v1", tok, N_IMG, 96)
    parts = [
        (tok.bos_id, False), (VICUNA_SYSTEM + " USER: ", False), ("IMG", False),
        ("\nWhat animal is this? ASSISTANT:", False), (" It is a cat.", True), (tok.eos_id, True),
        ("USER: What colour are its eyes? ASSISTANT:", False), (" They are green.", True), (tok.eos_id, True),
    ]  # fmt: skip
    check(sample, *expected(tok, parts, 96), num_images=1)
    text = tok.decode(sample.tokens[: sample.length])
    assert text.startswith("<s>" + VICUNA_SYSTEM + " USER: <image><image><image>\nWhat animal")
    assert text.endswith("ASSISTANT: It is a cat.</s>USER: What colour are its eyes? ASSISTANT: They are green.</s>")


def test_vicuna_v1_prompt_is_the_training_prefix(tok):
    # LLaVA's evaluation prompt: get_prompt() with the assistant's message None ends "ASSISTANT:".
    ids = encode_prompt(TWO_ROUNDS[:1], "vicuna_v1", tok, N_IMG)
    sample = encode_conversation(TWO_ROUNDS, "vicuna_v1", tok, N_IMG, 96)
    assert tok.decode(ids).endswith("What animal is this? ASSISTANT:")
    assert ids == sample.tokens[: len(ids)].tolist()
    ids = encode_prompt(TWO_ROUNDS[:3], "vicuna_v1", tok, N_IMG)
    assert tok.decode(ids).endswith("</s>USER: What colour are its eyes? ASSISTANT:")
    assert ids == sample.tokens[: len(ids)].tolist()


def test_single_image_moves_to_the_front(tok):
    # preprocess_multimodal: "<image>\n" + the rest of the turn with <image> removed, stripped.
    for value in ("What animal is this?\n<image>", "  What animal <image>is this?  ", "<image>What animal is this?"):
        moved = [{"from": "human", "value": value}, TWO_ROUNDS[1]]
        for template in ("plain", "vicuna_v1", "llama3"):
            a = encode_conversation(moved, template, tok, N_IMG, 128)
            b = encode_conversation(TWO_ROUNDS[:2], template, tok, N_IMG, 128)
            assert (a.tokens == b.tokens).all() and (a.labels == b.labels).all(), (value, template)


def test_leading_gpt_turn_is_dropped_and_turns_must_alternate(tok):
    # preprocess_v1 skips a first turn that is not from the human, and asserts alternation.
    a = encode_conversation([{"from": "gpt", "value": "Hello."}, *TWO_ROUNDS], "vicuna_v1", tok, N_IMG, 96)
    b = encode_conversation(TWO_ROUNDS, "vicuna_v1", tok, N_IMG, 96)
    assert (a.tokens == b.tokens).all() and (a.labels == b.labels).all()
    with pytest.raises(DataError, match="alternating"):
        encode_conversation([TWO_ROUNDS[0], TWO_ROUNDS[2], TWO_ROUNDS[1]], "vicuna_v1", tok, N_IMG, 96)


def test_llama3_two_rounds(tok):
    sample = encode_conversation(TWO_ROUNDS, "llama3", tok, N_IMG, 128)

    def header(role):
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n"

    # Each text between images is tokenized whole ("\n\nIt" is not "\n\n" + "It" for tiny).
    before = header("system") + LLAMA3_SYSTEM + "<|eot_id|>" + header("user")
    after = (
        "\nWhat animal is this?<|eot_id|>" + header("assistant") + "It is a cat.<|eot_id|>"
        + header("user") + "What colour are its eyes?<|eot_id|>" + header("assistant") + "They are green.<|eot_id|>"
    )  # fmt: skip
    ids = [tok.bos_id] + tok.encode(before) + [tok.image_token_id] * N_IMG + tok.encode(after)
    assert sample.tokens[: sample.length].tolist() == ids and sample.num_images == 1 and not sample.truncated
    # Trained: each answer and its <|eot_id|>, nothing else.
    labels = sample.labels[: sample.length]
    trained = labels != IGNORE_INDEX
    runs = np.split(labels, np.flatnonzero(np.diff(trained)) + 1)
    assert [tok.decode(r.tolist()) for r in runs if r[0] != IGNORE_INDEX] == [
        "It is a cat.<|eot_id|>", "They are green.<|eot_id|>"
    ]
    assert (labels[trained] == sample.tokens[1 : sample.length][trained[: sample.length - 1]]).all()


# Meta-Llama-3-8B-Instruct's tokenizer_config.json chat_template.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def test_llama3_is_the_llama3_chat_format(tok):
    turns = [
        {"from": "human", "value": "What is a galaxy?  "},
        {"from": "gpt", "value": " A huge group of stars.\n"},
        {"from": "human", "value": "Name one."},
        {"from": "gpt", "value": "The Milky Way."},
    ]
    messages = [{"role": "system", "content": LLAMA3_SYSTEM}]
    messages += [{"role": {"human": "user", "gpt": "assistant"}[t["from"]], "content": t["value"]} for t in turns]
    sample = encode_conversation(turns, "llama3", tok, N_IMG, 128)
    want = tok.hf.apply_chat_template(messages, chat_template=LLAMA3_CHAT_TEMPLATE, tokenize=False)
    assert tok.decode(sample.tokens[: sample.length]) == want
    prompt = tok.hf.apply_chat_template(
        messages[:2], chat_template=LLAMA3_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    assert tok.decode(encode_prompt(turns[:1], "llama3", tok, N_IMG)) == prompt


def test_user_assistant_roles_are_aliases(tok):
    aliased = [{"from": {"human": "user", "gpt": "assistant"}[t["from"]], "value": t["value"]} for t in TWO_ROUNDS]
    for template in ("plain", "vicuna_v1", "llama3"):
        a = encode_conversation(TWO_ROUNDS, template, tok, N_IMG, 128)
        b = encode_conversation(aliased, template, tok, N_IMG, 128)
        assert (a.tokens == b.tokens).all() and (a.labels == b.labels).all()


def test_multi_image_runs_stay_in_place(tok):
    # Two or more images in a turn: left where they are, text unstripped (LLaVA-NeXT).
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
    parts = [(tok.bos_id, False), ("IMG", False), ("IMG", False), ("No.\n", True)]
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
    assert full.length > 1 + 2 * N_IMG and not full.truncated  # <s>, 2 runs, answer, "\n"
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
