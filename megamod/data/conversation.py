"""Conversation templates: LLaVA-JSON turns -> fixed-length token ids and loss labels.

Follows LLaVA-1.5 (llava-torch 1.2.2.post1: `llava/conversation.py`, `llava/train/train.py`'s
`preprocess_multimodal`, `preprocess_plain`, `preprocess_v1`, `llava/mm_utils.py`'s
`tokenizer_image_token`) and LLaVA-NeXT's Llama-3 template. For `plain` and `vicuna_v1`
the tokens and labels are the official code's, token for token, with Vicuna's tokenizer
(tests/data/test_official_llava.py runs the official functions and compares).
`<s>`/`</s>` below stand for the tokenizer's BOS/EOS (`<s>` is left out when the tokenizer
has no BOS; a Llama-3 tokenizer's is `<|begin_of_text|>`):

- `plain` (stage-1 captioning, LLaVA's `conv_llava_plain`, `preprocess_plain`):
  `<s><image>{caption}\\n`. The human turn is replaced by its images; the caption and the
  "\\n" separator take loss, as in LLaVA (no `</s>`).
- `vicuna_v1` (LLaVA-1.5's `conv_vicuna_v1`, `preprocess_v1`):
  `<s>{system} USER: {q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT: {a2}</s>`, system "A chat
  between a curious user and an artificial intelligence assistant. ...". Each answer, from
  the token holding the space after "ASSISTANT:", through `</s>` takes loss.
- `llama3` (LLaVA-NeXT's `conv_llava_llama_3`: its system prompt, rendered with
  Meta-Llama-3-8B-Instruct's chat template):
  `<s><|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>` then
  `<|start_header_id|>{user|assistant}<|end_header_id|>\\n\\n{text, trimmed}<|eot_id|>` per
  turn; the answers and their `<|eot_id|>` take loss. The markers are special tokens of
  Llama-3's tokenizer and of "tiny". Where we depart: LLaVA-NeXT's `preprocess_llama3` also
  trains the whole assistant header and, in every turn, each `<|begin_of_text|>`,
  `<|start_header_id|>`, `<|end_header_id|>` and `<|eot_id|>`; we train what `vicuna_v1`
  trains (the answers and their end-of-turn token).

Images (`preprocess_multimodal`): a turn with one `<image>` is rewritten as LLaVA-1.5 does,
`<image>\\n` + the rest of the turn stripped (an image at the end of a question moves to the
front). Where we depart: LLaVA-1.5 also collapses several `<image>` of one turn into one
(it trains one image per sample); a turn with two or more `<image>` (MIMIC-IT's
multi-image samples) is left as written, every image in place, as LLaVA-NeXT's
`preprocess_multimodal` leaves interleaved turns. In `plain` the human turn is replaced by
as many `<image>` as it holds (LLaVA: exactly one). Each `<image>` becomes a run of
`num_image_tokens` image-token ids (LLaVA: one IMAGE_TOKEN_INDEX, expanded in the model).

Tokenization is `tokenizer_image_token`'s: the rendered prompt is split at `<image>` and
each piece tokenized whole (so `</s>USER` tokenizes as in LLaVA, with no "▁" before USER
under Vicuna's non-legacy tokenizer). Labels come from the characters each token starts at,
not from LLaVA's round-length arithmetic: the two agree whenever LLaVA's arithmetic fits the
tokenizer. Where we depart: `preprocess_v1` counts each later round standalone and, for a
non-legacy tokenizer under tokenizers >= 0.14 (Vicuna-7b-v1.5's), subtracts one token, which
is right only where "USER" after `</s>` takes one token fewer than "▁USER" at a text's start
(the Vicuna/Llama-2 vocabulary the correction was written for). With a SentencePiece
vocabulary where that does not hold, LLaVA prints "tokenization mismatch" and masks every
label of a multi-turn sample; we train its answers.

Truncation (LLaVA: at `model_max_length` after the image is expanded) keeps the first
`seq_length` tokens, except that an image run is never split: an image that does not fit
whole is dropped with everything after it (LLaVA keeps the part that fits).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megamod.data.tokenizer import IMAGE_TOKEN, Tokenizer
from megamod.errors import ConfigError, DataError

IGNORE_INDEX = -100
TEMPLATES = ("plain", "vicuna_v1", "llama3")

# llava/conversation.py: conv_vicuna_v1.system (conv_llava_v1's "curious human" one is not
# what LLaVA-1.5 trains or evaluates with).
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
VICUNA_ROLES = ("USER", "ASSISTANT")
PLAIN_SEP = "\n"  # conv_llava_plain.sep
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


def _move_images(value: str) -> str:
    """`preprocess_multimodal` (mm_use_im_start_end False) for a turn with one `<image>`;
    a turn with several keeps them in place (see the module docstring)."""
    if value.count(IMAGE_TOKEN) != 1:
        return value
    return (IMAGE_TOKEN + "\n" + value.replace(IMAGE_TOKEN, "").strip()).strip()


def _normalise_turns(turns: list[dict], template: str) -> list[tuple[str, str]]:
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or not isinstance(turn.get("value"), str):
            raise DataError(f"conversation turn {i} is {turn!r}: each turn needs 'from' and a string 'value'")
        role = _ROLES.get(turn["from"])
        if role is None:
            raise DataError(
                f"conversation turn {i} has role {turn['from']!r}: 'from' must be one of {sorted(_ROLES)}"
            )
        out.append((role, _move_images(turn["value"])))
    if out and out[0][0] != "human":  # preprocess_v1: "Skip the first one if it is not from human"
        out = out[1:]
    if template == "vicuna_v1":
        for j, (role, _) in enumerate(out):
            if role != ("human", "gpt")[j % 2]:
                raise DataError(
                    f"conversation turn {j} is from {role!r}: vicuna_v1 needs turns alternating human, gpt "
                    "(LLaVA's preprocess_v1 asserts the same)"
                )
    return out


# A rendered conversation: (text, trained) segments whose concatenation is the prompt.
_Segments = list[tuple[str, bool]]


def _render(turns: list[tuple[str, str]], template: str, tok: Tokenizer, prompt: bool) -> _Segments:
    """The prompt text as LLaVA's `get_prompt()` / `preprocess_plain` writes it, with the
    characters that take loss flagged. `prompt`: end with the assistant's cue instead
    (`append_message(roles[1], None)`)."""
    if template not in TEMPLATES:
        raise ConfigError(f"unknown conversation template {template!r}: use one of {', '.join(TEMPLATES)}")
    eos = tok.hf.eos_token
    segments: _Segments = []
    if template == "plain":
        for role, value in turns:
            if role == "human":
                segments.append((IMAGE_TOKEN * value.count(IMAGE_TOKEN), False))
            else:
                segments.append((value + PLAIN_SEP, True))
    elif template == "vicuna_v1":
        # SeparatorStyle.TWO: system + sep, then "ROLE: message" + (sep | sep2), or "ROLE:"
        # for an empty message.
        segments.append((VICUNA_SYSTEM + " ", False))
        for role, value in turns + ([("gpt", "")] if prompt else []):
            name = VICUNA_ROLES[role == "gpt"]
            if not value:
                segments.append((name + ":", False))
            elif role == "human":
                segments.append((f"{name}: {value} ", False))
            else:
                segments += [(name + ":", False), (" " + value + eos, True)]
    else:
        # Llama-3-Instruct's chat template: each message's content is trimmed.
        segments.append((_llama3_header("system") + LLAMA3_SYSTEM + LLAMA3_EOT, False))
        for role, value in turns:
            if role == "human":
                segments.append((_llama3_header("user") + value.strip() + LLAMA3_EOT, False))
            else:
                segments += [(_llama3_header("assistant"), False), (value.strip() + LLAMA3_EOT, True)]
        if prompt:
            segments.append((_llama3_header("assistant"), False))
    return segments


def _tokenize(
    segments: _Segments, tokenizer: Tokenizer, num_image_tokens: int
) -> tuple[list[int], list[bool], list[tuple[int, int]]]:
    """Token ids, their loss flags and the [start, end) of each image run.

    As `tokenizer_image_token`: BOS, then the prompt split at `<image>`, each piece tokenized
    whole, an image run between pieces. A token takes loss when the character it starts at
    does (image tokens never do).
    """
    text = "".join(s for s, _ in segments)
    char_trained = np.zeros(len(text) + 1, dtype=bool)
    pos = 0
    for s, is_trained in segments:
        char_trained[pos : pos + len(s)] = is_trained
        pos += len(s)

    ids: list[int] = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    trained: list[bool] = [False] * len(ids)
    image_runs: list[tuple[int, int]] = []
    start = 0
    for k, chunk in enumerate(text.split(IMAGE_TOKEN)):
        if k > 0:
            image_runs.append((len(ids), len(ids) + num_image_tokens))
            ids += [tokenizer.image_token_id] * num_image_tokens
            trained += [False] * num_image_tokens
            start += len(IMAGE_TOKEN)
        if chunk:
            new, offsets = tokenizer.encode_with_offsets(chunk)
            ids += new
            trained += [bool(char_trained[start + min(a, len(chunk) - 1)]) for a, _ in offsets]
        start += len(chunk)
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

    segments = _render(_normalise_turns(turns, template), template, tokenizer, prompt=False)
    ids, trained, image_runs = _tokenize(segments, tokenizer, num_image_tokens)

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
    """Token ids of `turns` (ending with a human turn) followed by the assistant's cue: the
    prompt a model trained on `template` answers. For `vicuna_v1` this is LLaVA's evaluation
    prompt (`llava/eval/model_vqa_loader.py`: `<image>\\n` + question, `get_prompt()` with
    the assistant's message None, so it ends "ASSISTANT:"); turns are normalised as in
    training, so a question's single `<image>` moves to the front and the question is
    stripped (LLaVA's evaluation does not strip the question)."""
    segments = _render(_normalise_turns(turns, template), template, tokenizer, prompt=True)
    return _tokenize(segments, tokenizer, num_image_tokens)[0]
