"""Tokenizers for megamod: the bundled offline "tiny" BPE and local Hugging Face ones.

`load_tokenizer("tiny")` needs no network and no download: it reads a byte-level BPE of
875 tokens shipped in `assets/tiny_tokenizer.json`, trained on the texts of the
bundled tiny data set (`megamod.data.tiny`) and the fixed words of the conversation
templates, so the CPU quickstart encodes its samples in few tokens. Any other value is a
local directory holding a Hugging Face tokenizer (e.g. a Vicuna or Llama-3 checkpoint's).

Regenerate the asset after changing the tiny texts or templates with
`python -m megamod.data.tokenizer`; a test fails while the shipped file is stale.
"""

from __future__ import annotations

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
    only its embedding row is read there.
    """

    hf: PreTrainedTokenizerBase
    image_token_id: int
    pad_id: int
    bos_id: int | None
    eos_id: int

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no BOS/EOS added."""
        return self.hf.encode(text, add_special_tokens=False)

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


def load_tokenizer(name_or_path: str) -> Tokenizer:
    """Load "tiny" (bundled) or the Hugging Face tokenizer in the local directory given.

    A Hugging Face tokenizer without an `<image>` token gets one added as a special token
    (its id is then `vocab_size - 1`: the model's embedding must cover it).
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
        try:
            hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot load a Hugging Face tokenizer from {str(path)!r}: {e}") from e
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
    )


if __name__ == "__main__":
    from megamod.data.tiny import tokenizer_corpus

    train_tiny_tokenizer(tokenizer_corpus()).save(str(TINY_TOKENIZER_PATH), pretty=True)
    print(f"wrote {TINY_TOKENIZER_PATH}")
