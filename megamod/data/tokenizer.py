"""Tokenizers for megamod: the bundled offline "tiny" BPE and local Hugging Face ones.

`load_tokenizer("tiny")` needs no network and no download: it reads a byte-level BPE of
887 tokens shipped in `assets/tiny_tokenizer.json`, trained on the texts of the
bundled tiny data set (`megamod.data.tiny`) and the fixed words of the conversation
templates, so the CPU quickstart encodes its samples in few tokens. Any other value is a
local directory holding a Hugging Face tokenizer (e.g. a Vicuna or Llama-3 checkpoint's):
a `tokenizer.json`, or a SentencePiece `tokenizer.model` with its `tokenizer_config.json`
as lmsys/vicuna-7b-v1.5 ships it (read through the `sentencepiece` and `protobuf` packages).

Where we depart from LLaVA: LLaVA loads Vicuna's tokenizer as transformers 4.x's slow
SentencePiece `LlamaTokenizer` (`use_fast=False`); transformers 5 has only the converted
fast one, which megamod uses. The two give the same ids except for a text that starts with a
space, where the converted tokenizer drops SentencePiece's dummy prefix ("▁It" for " It",
where SentencePiece and LLaVA give "▁", "▁It"); `Tokenizer.encode` puts it back, so megamod's
ids are LLaVA's (tests/data/test_official_llava.py compares them on the tiny corpus).

Regenerate the asset after changing the tiny texts or templates with
`python -m megamod.data.tiny`; a test fails while the shipped file is stale.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from megamod.data.formats import IMAGE_MARKER as IMAGE_TOKEN  # the text's marker is the token
from megamod.errors import DataError

TINY_TOKENIZER_PATH = Path(__file__).parent / "assets" / "tiny_tokenizer.json"
TINY_VOCAB_SIZE = 1000
# Order fixes their ids: <pad> = 0, <s> = 1, </s> = 2, <image> = 3. Llama-3's chat markers
# are single tokens too, so the llama3 template encodes as it does with a Llama-3 tokenizer.
TINY_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", IMAGE_TOKEN, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


@dataclass(frozen=True)
class Tokenizer:
    """A Hugging Face tokenizer plus the ids the data pipeline needs.

    `bos_id` is None for tokenizers without a beginning-of-sequence token. `pad_id` is the
    tokenizer's pad token, else its unk, else its eos: padded positions never take loss, so
    only its embedding row is read there (LLaVA sets Vicuna's pad to unk too).
    `dummy_prefix` is True for a SentencePiece-converted tokenizer (a Metaspace
    pre-tokenizer that prepends "▁"): see `encode`.
    """

    hf: PreTrainedTokenizerBase
    image_token_id: int
    pad_id: int
    bos_id: int | None
    eos_id: int
    dummy_prefix: bool = False

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no BOS/EOS added."""
        return self.encode_with_offsets(text)[0]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of `text` (no BOS/EOS) and each token's [start, end) characters in it.

        Special tokens written in the text (`</s>`, `<|eot_id|>`) become their ids. With
        `dummy_prefix`, a text that starts with a space is tokenized as SentencePiece does
        it (LLaVA's slow `LlamaTokenizer` too): "▁" is prepended whatever follows, so " It"
        is "▁", "▁It"; transformers' Metaspace leaves the prefix out before a space ("▁It").
        """
        shift = 1 if self.dummy_prefix and text[:1] in (" ", "▁") else 0
        enc = self.hf(" " * shift + text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = [(max(a - shift, 0), max(b - shift, 0)) for a, b in enc["offset_mapping"]]
        return list(enc["input_ids"]), offsets

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int = TINY_VOCAB_SIZE) -> tokenizers.Tokenizer:
    """Train the byte-level BPE shipped as the "tiny" tokenizer (deterministic, ~1 s).

    Byte-level, so any text encodes (unseen words just take more tokens). On a corpus as
    small as the tiny data set the merges run out before `vocab_size`: every corpus word
    then is a single token.
    """
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def _has_dummy_prefix(hf: PreTrainedTokenizerBase) -> bool:
    backend = getattr(hf, "backend_tokenizer", None)
    pre = backend.pre_tokenizer if backend is not None else None
    if isinstance(pre, pre_tokenizers.Sequence):
        pre = next((p for p in pre if isinstance(p, pre_tokenizers.Metaspace)), None)
    return isinstance(pre, pre_tokenizers.Metaspace) and pre.prepend_scheme in ("first", "always")


def _folder_help(path: Path) -> str:
    """What the folder holds and what a tokenizer folder needs, for error messages."""
    files = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    listing = ", ".join(files[:20]) + (", ..." if len(files) > 20 else "") if files else "nothing"
    return (
        f"the folder holds {listing}; a Hugging Face tokenizer folder needs tokenizer.json, or a "
        "SentencePiece tokenizer.model with its tokenizer_config.json (as Llama/Vicuna ship it)"
    )


def _missing_sentencepiece_packages(path: Path) -> list[str]:
    """Packages transformers needs to convert this folder's tokenizer.model and lacks."""
    if not (path / "tokenizer.model").is_file() or (path / "tokenizer.json").is_file():
        return []
    wanted = {"sentencepiece": "sentencepiece", "protobuf": "google.protobuf"}
    missing = []
    for package, module in wanted.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(package)
    return missing


def load_tokenizer(name_or_path: str) -> Tokenizer:
    """Load "tiny" (bundled) or the Hugging Face tokenizer in the local directory given.

    A Hugging Face tokenizer without an `<image>` token gets one added as a special token
    (its id is then `vocab_size - 1`: the model's embedding must cover it). A folder with a
    SentencePiece `tokenizer.model` and no `tokenizer.json` (lmsys/vicuna-7b-v1.5) needs the
    `sentencepiece` and `protobuf` packages; a folder that does not load raises DataError
    naming the files it holds and what is needed.
    """
    if name_or_path == "tiny":
        hf = PreTrainedTokenizerFast(
            tokenizer_file=str(TINY_TOKENIZER_PATH), bos_token="<s>", eos_token="</s>", pad_token="<pad>"
        )
    else:
        path = Path(name_or_path)
        if not path.is_dir():
            raise DataError(
                f"tokenizer {name_or_path!r} is neither 'tiny' nor an existing directory: "
                "give 'tiny' or a local directory holding a Hugging Face tokenizer (tokenizer.json or tokenizer.model)"
            )
        missing = _missing_sentencepiece_packages(path)
        if missing:
            raise DataError(
                f"cannot load the tokenizer in {str(path)!r}: its tokenizer.model is a SentencePiece model "
                f"(there is no tokenizer.json), which needs the {' and '.join(missing)} package"
                f"{'s' if len(missing) > 1 else ''}: pip install {' '.join(missing)}"
            )
        try:
            hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, ImportError, KeyError) as e:
            raise DataError(f"cannot load a Hugging Face tokenizer from {str(path)!r}: {e} ({_folder_help(path)})") from e
        if not hf.is_fast:
            raise DataError(
                f"the tokenizer in {str(path)!r} loaded as a Python-only {type(hf).__name__}: megamod needs one "
                f"backed by the `tokenizers` library (for token offsets); {_folder_help(path)}"
            )
        if IMAGE_TOKEN not in hf.get_vocab():
            hf.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if hf.eos_token_id is None:
        raise DataError(f"tokenizer {name_or_path!r} has no eos token: answers could not be terminated; set eos_token")
    pad_id = next(i for i in (hf.pad_token_id, hf.unk_token_id, hf.eos_token_id) if i is not None)
    return Tokenizer(
        hf=hf,
        image_token_id=hf.convert_tokens_to_ids(IMAGE_TOKEN),
        pad_id=pad_id,
        bos_id=hf.bos_token_id,
        eos_id=hf.eos_token_id,
        dummy_prefix=_has_dummy_prefix(hf),
    )

