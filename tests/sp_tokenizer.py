"""A Llama/Vicuna-style SentencePiece tokenizer folder, built offline for tests.

`build_llama_sp_tokenizer(out_dir)` trains a small SentencePiece BPE model the way Llama's
`tokenizer.model` is configured (unk=0 `<unk>`, bos=1 `<s>`, eos=2 `</s>`, no pad, byte
fallback, a dummy prefix "▁", no whitespace normalisation, digits split) on the bundled
tiny data set's texts and the conversation templates' words, and writes it as
lmsys/vicuna-7b-v1.5 ships its tokenizer: `tokenizer.model` + `tokenizer_config.json` +
`special_tokens_map.json`, and no `tokenizer.json`. Training takes well under a second.

The folder is a real-kind tokenizer for tests that train, generate or dry-run: it loads
with `megamod.data.tokenizer.load_tokenizer`, and with `transformers.AutoTokenizer` as
LLaVA loads Vicuna's (`use_fast=False` under transformers 4.x).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import sentencepiece as spm

from megamod.data.tiny import tokenizer_corpus

SP_VOCAB_SIZE = 800

_SPECIAL = {"__type": "AddedToken", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

# lmsys/vicuna-7b-v1.5's tokenizer_config.json, key for key.
VICUNA_TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": {**_SPECIAL, "content": "<s>"},
    "clean_up_tokenization_spaces": False,
    "eos_token": {**_SPECIAL, "content": "</s>"},
    "legacy": False,
    "model_max_length": 4096,
    "pad_token": None,
    "padding_side": "right",
    "sp_model_kwargs": {},
    "tokenizer_class": "LlamaTokenizer",
    "unk_token": {**_SPECIAL, "content": "<unk>"},
}
VICUNA_SPECIAL_TOKENS_MAP = {
    "bos_token": {"content": "<s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
    "eos_token": {"content": "</s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
    "unk_token": {"content": "<unk>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
}


def _training_lines() -> list[str]:
    """The tiny corpus (answers, questions, template words), one line per text line,
    without `<image>` (the loaders add it as a special token)."""
    lines = []
    for text in tokenizer_corpus():
        for line in text.replace("<image>", "").split("\n"):
            if line.strip():
                lines.append(line)
    return lines


def build_llama_sp_tokenizer(out_dir: Path, *, llama_user_split: bool = False) -> Path:
    """Train the SentencePiece model and write the tokenizer folder `out_dir`; returns it.

    Trainer settings follow Llama-2's `tokenizer.model` (BPE, byte fallback, digits split,
    dummy prefix, identity normalisation without whitespace folding, unk/bos/eos = 0/1/2, no
    pad), except the vocabulary size (SP_VOCAB_SIZE instead of 32000) and
    `character_coverage` 1.0 (the corpus is tiny).

    `llama_user_split`: make "USER" a user-defined piece, so that "▁USER" at a text's start
    is two tokens and "USER" after `</s>` one: the property LLaVA's `preprocess_v1` assumes
    of Vicuna's vocabulary when it subtracts one token per later round (see
    megamod/data/conversation.py). Off by default: a plain trained vocabulary lacks it.
    transformers 5 turns the user-defined piece into an added token, which loses the "▁"
    before a "USER" that starts a text (SentencePiece keeps it).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_lines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=SP_VOCAB_SIZE,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        max_sentencepiece_length=16,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        hard_vocab_limit=False,
        num_threads=1,
        user_defined_symbols=["USER"] if llama_user_split else [],
        minloglevel=2,
    )
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    (out_dir / "tokenizer_config.json").write_text(json.dumps(VICUNA_TOKENIZER_CONFIG, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(VICUNA_SPECIAL_TOKENS_MAP, indent=2) + "\n")
    return out_dir
