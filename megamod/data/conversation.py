"""Conversation templates: LLaVA-JSON turns -> fixed-length token ids and loss labels.

Follows LLaVA's `conversation.py` / `train.py` (and LLaVA-NeXT's Llama-3 template).
`<s>`/`</s>` below stand for the tokenizer's BOS/EOS ids (`<s>` is left out when the
tokenizer has no BOS; a Llama-3 tokenizer's is `<|begin_of_text|>`):

- `plain` (stage-1 captioning, LLaVA's `conv_llava_plain`): `<s>`, then per human turn
  only its images (its text is dropped, as LLaVA replaces it by `<image>`), per assistant
  turn the answer and `</s>`: `<s><image>{caption}</s>`.
- `vicuna_v1` (LLaVA-1.5's `conv_vicuna_v1`): `<s>{system} USER: {q} ASSISTANT: {a}</s>USER: ...`.
- `llama3` (LLaVA-NeXT's `conv_llava_llama_3`):
  `<s><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>` then
  `<|start_header_id|>{user|assistant}<|end_header_id|>\n\n{text}<|eot_id|>` per turn.
  The markers are special tokens of Llama-3's tokenizer and of "tiny".

In every template only the assistant's answers and their end-of-turn token (`</s>` or
`<|eot_id|>`) take loss. Unlike LLaVA, an `<image>` stays where the text puts it (LLaVA
moves a single one to the front of the first turn), which is what multi-image samples need.

Tokenization: each maximal stretch of text with the same loss flag is tokenized on its own,
split at `<image>` as LLaVA's `tokenizer_image_token` does (so an answer is tokenized apart
from the prompt before it; special tokens split the text anyway). The label mask then
follows the piece boundaries exactly instead of being re-derived from a tokenization of
the whole prompt (LLaVA's off-by-one-prone round lengths).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megamod.data.tokenizer import IMAGE_TOKEN, Tokenizer
from megamod.errors import ConfigError, DataError

IGNORE_INDEX = -100
TEMPLATES = ("plain", "vicuna_v1", "llama3")

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAMA3_SYSTEM = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)
LLAMA3_EOT = "<|eot_id|>"


def _llama3_header(role: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


# The fixed words of the templates as they are tokenized (the Llama-3 markers are special
# tokens of the tiny tokenizer): part of the tiny tokenizer's training corpus.
TEMPLATE_TEXTS = (VICUNA_SYSTEM + " USER: ASSISTANT:", "USER:", "system", "user", "assistant", "\n\n", LLAMA3_SYSTEM)

_ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


@dataclass
class EncodedSample:
    """One sample, ready to batch.

    `labels` are already shifted (Megatron convention): `labels[i]` is the target at
    position i, i.e. `tokens[i + 1]`, or IGNORE_INDEX where no loss is taken.
    `num_images` is how many image runs `tokens` holds: always the first `num_images`
    of the sample's images (truncation drops an image whole, with all after it).
    `length` is the number of tokens before padding.
    """

    tokens: np.ndarray
    labels: np.ndarray
    num_images: int
    truncated: bool
    length: int


# A template renders turns as (piece, trained) pairs; a piece is text (that may hold
# <image>) or a single token id.
_Piece = tuple[str | int, bool]


def _render(turns: list[tuple[str, str]], template: str, tok: Tokenizer) -> list[_Piece]:
    if template not in TEMPLATES:
        raise ConfigError(f"unknown conversation template {template!r}: use one of {', '.join(TEMPLATES)}")
    pieces: list[_Piece] = [] if tok.bos_id is None else [(tok.bos_id, False)]
    if template == "plain":
        for role, value in turns:
            if role == "human":
                pieces.append((IMAGE_TOKEN * value.count(IMAGE_TOKEN), False))
            else:
                pieces += [(value, True), (tok.eos_id, True)]
    elif template == "vicuna_v1":
        pieces.append((VICUNA_SYSTEM + " ", False))
        for role, value in turns:
            if role == "human":
                pieces.append((f"USER: {value} ", False))
            else:
                pieces += [("ASSISTANT:", False), (" " + value, True), (tok.eos_id, True)]
    else:
        pieces.append((_llama3_header("system") + LLAMA3_SYSTEM + LLAMA3_EOT, False))
        for role, value in turns:
            if role == "human":
                pieces.append((_llama3_header("user") + value + LLAMA3_EOT, False))
            else:
                pieces += [(_llama3_header("assistant"), False), (value + LLAMA3_EOT, True)]
    return pieces


def _merge_text(pieces: list[_Piece]) -> list[_Piece]:
    """Join adjacent text pieces with the same loss flag, so a prompt tokenizes as one text."""
    out: list[_Piece] = []
    for piece, is_trained in pieces:
        if out and isinstance(piece, str) and isinstance(out[-1][0], str) and out[-1][1] == is_trained:
            out[-1] = (out[-1][0] + piece, is_trained)
        else:
            out.append((piece, is_trained))
    return out


def _normalise_turns(turns: list[dict]) -> list[tuple[str, str]]:
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or not isinstance(turn.get("value"), str):
            raise DataError(f"conversation turn {i} is {turn!r}: each turn needs 'from' and a string 'value'")
        role = _ROLES.get(turn["from"])
        if role is None:
            raise DataError(
                f"conversation turn {i} has role {turn['from']!r}: 'from' must be one of {sorted(_ROLES)}"
            )
        out.append((role, turn["value"]))
    return out


def _tokenize(
    pieces: list[_Piece], tokenizer: Tokenizer, num_image_tokens: int
) -> tuple[list[int], list[bool], list[tuple[int, int]]]:
    """Token ids, their loss flags and the [start, end) of each image run."""
    ids: list[int] = []
    trained: list[bool] = []
    image_runs: list[tuple[int, int]] = []
    for piece, is_trained in _merge_text(pieces):
        if isinstance(piece, int):
            ids.append(piece)
            trained.append(is_trained)
            continue
        for k, text in enumerate(piece.split(IMAGE_TOKEN)):
            if k > 0:  # an <image> stood before this text; image tokens never take loss
                image_runs.append((len(ids), len(ids) + num_image_tokens))
                ids += [tokenizer.image_token_id] * num_image_tokens
                trained += [False] * num_image_tokens
            if text:
                new = tokenizer.encode(text)
                ids += new
                trained += [is_trained] * len(new)
    return ids, trained, image_runs


def encode_conversation(
    turns: list[dict], template: str, tokenizer: Tokenizer, num_image_tokens: int, seq_length: int
) -> EncodedSample:
    """Tokenize LLaVA-JSON `turns` with `template`, expanding each `<image>` to
    `num_image_tokens` image-token ids, and truncate/pad to `seq_length`.

    Truncation never splits an image run: an image that does not fit whole is dropped
    with everything after it. A sample left with no trained label is still returned
    (with `truncated=True`); the caller decides whether to skip it.
    """
    if num_image_tokens < 1 or seq_length < 2:
        raise ValueError(f"need num_image_tokens >= 1 and seq_length >= 2, got {num_image_tokens}, {seq_length}")

    pieces = _render(_normalise_turns(turns), template, tokenizer)
    ids, trained, image_runs = _tokenize(pieces, tokenizer, num_image_tokens)

    cut = min(len(ids), seq_length)
    for start, end in image_runs:
        if start < cut < end:
            cut = start
    num_images = sum(end <= cut for _, end in image_runs)

    tokens = np.full(seq_length, tokenizer.pad_id, dtype=np.int64)
    tokens[:cut] = ids[:cut]
    labels = np.full(seq_length, IGNORE_INDEX, dtype=np.int64)
    next_trained = np.asarray(trained[1:cut], dtype=bool)
    labels[: max(cut - 1, 0)] = np.where(next_trained, tokens[1:cut], IGNORE_INDEX)
    return EncodedSample(
        tokens=tokens, labels=labels, num_images=num_images, truncated=len(ids) > cut, length=cut
    )


def encode_prompt(turns: list[dict], template: str, tokenizer: Tokenizer, num_image_tokens: int) -> list[int]:
    """Token ids of `turns` (ending with a human turn) followed by the assistant's header:
    the prompt a model trained on `template` answers, rendered as training renders it
    (LLaVA's `get_prompt()` with an empty assistant message: "... ASSISTANT:")."""
    pieces = _render(_normalise_turns(turns) + [("gpt", "")], template, tokenizer)
    while pieces and pieces[-1][1]:  # the empty answer and its end-of-turn token
        pieces.pop()
    return _tokenize(pieces, tokenizer, num_image_tokens)[0]
