"""The tiny tokenizer asset, its special tokens, and loading local Hugging Face tokenizers."""

import importlib.util
import json

import pytest
import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from megamod.data.tiny import tokenizer_corpus
from megamod.data.tokenizer import TINY_SPECIAL_TOKENS, TINY_TOKENIZER_PATH, load_tokenizer, train_tiny_tokenizer
from megamod.errors import DataError


@pytest.fixture(scope="module")
def tiny():
    return load_tokenizer("tiny")


def test_shipped_asset_matches_retraining():
    retrained = json.loads(train_tiny_tokenizer(tokenizer_corpus()).to_str())
    shipped = json.loads(TINY_TOKENIZER_PATH.read_text())
    assert retrained == shipped, "tiny_tokenizer.json is stale: run `python -m megamod.data.tiny`"


def test_tiny_ids_and_size(tiny):
    assert (tiny.pad_id, tiny.bos_id, tiny.eos_id, tiny.image_token_id) == (0, 1, 2, 3)
    assert 800 <= tiny.vocab_size <= 1000
    assert tiny.vocab_size == len(json.loads(TINY_TOKENIZER_PATH.read_text())["model"]["vocab"])


def test_special_tokens_are_single_ids_and_round_trip(tiny):
    for special in TINY_SPECIAL_TOKENS:
        assert len(tiny.encode(special)) == 1, special
    text = "<s>USER: <image>\n<image>\nWhat is it?<|eot_id|> A cat.</s><pad>"
    ids = tiny.encode(text)
    assert ids.count(tiny.image_token_id) == 2
    assert tiny.decode(ids) == text
    assert tiny.decode(ids, skip_special_tokens=True) == "USER: \n\nWhat is it? A cat."


def test_encodes_tiny_texts_compactly_and_anything_else(tiny):
    corpus = tokenizer_corpus()
    words = sum(len(t.split()) for t in corpus)
    tokens = sum(len(tiny.encode(t)) for t in corpus)
    assert tokens < 1.5 * words  # (measured 1.2: words and their punctuation are single tokens)
    unseen = "Zebras & quokkas: 42°C!"
    assert tiny.decode(tiny.encode(unseen)) == unseen  # byte-level: no unknown tokens


def _save_hf_tokenizer(path, special_tokens):
    """A small byte-level BPE saved the way a Hugging Face checkpoint ships its tokenizer."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["hello world, a small test"], trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")
    hf.save_pretrained(path)
    return len(hf)


def test_local_hf_directory_without_image_token_gets_one(tmp_path):
    n = _save_hf_tokenizer(tmp_path, ["</s>"])
    tok = load_tokenizer(str(tmp_path))
    assert tok.vocab_size == n + 1 and tok.image_token_id == n
    assert tok.encode("a <image> b").count(tok.image_token_id) == 1
    assert tok.decode(tok.encode("a <image> b")) == "a <image> b"
    # No pad, no unk: padding falls back to eos (padded positions take no loss anyway).
    assert tok.bos_id is None and tok.pad_id == tok.eos_id == 0


def test_local_hf_directory_keeps_its_image_token(tmp_path):
    n = _save_hf_tokenizer(tmp_path, ["</s>", "<image>"])
    tok = load_tokenizer(str(tmp_path))
    assert tok.vocab_size == n and tok.image_token_id == 1


def test_missing_path_is_data_error(tmp_path):
    with pytest.raises(DataError, match="no_such_dir"):
        load_tokenizer(str(tmp_path / "no_such_dir"))
    with pytest.raises(DataError, match="cannot load a Hugging Face tokenizer"):
        load_tokenizer(str(tmp_path))  # exists, but holds no tokenizer


# --- A Llama/Vicuna-style SentencePiece folder (tokenizer.model, no tokenizer.json) ---


def test_sentencepiece_folder_loads(llama_sp_tokenizer):
    assert sorted(p.name for p in llama_sp_tokenizer.iterdir()) == [
        "special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"
    ]  # fmt: skip
    tok = load_tokenizer(str(llama_sp_tokenizer))
    sp = spm.SentencePieceProcessor(model_file=str(llama_sp_tokenizer / "tokenizer.model"))
    assert (tok.bos_id, tok.eos_id) == (1, 2) == (sp.bos_id(), sp.eos_id())
    assert tok.pad_id == 0 == sp.unk_id() and tok.hf.pad_token_id is None  # no pad: falls back to unk
    assert tok.image_token_id == sp.get_piece_size() and tok.vocab_size == sp.get_piece_size() + 1
    assert tok.dummy_prefix
    text = "USER: <image>\nWhat is in the photo? ASSISTANT: A cup of espresso.</s>"
    ids = tok.encode(text)
    assert ids.count(tok.image_token_id) == 1 and ids[-1] == tok.eos_id
    assert tok.decode(ids) == text
    unseen = "Zebras & quokkas: 42°C!"  # byte fallback: no unknown tokens
    assert tok.decode(tok.encode(unseen)) == unseen and tok.pad_id not in tok.encode(unseen)


def test_sentencepiece_folder_encodes_as_sentencepiece(llama_sp_tokenizer):
    """Against the sentencepiece library itself (texts without special tokens), including
    texts that start with a space, where transformers' converted tokenizer alone would
    leave out the dummy prefix."""
    tok = load_tokenizer(str(llama_sp_tokenizer))
    sp = spm.SentencePieceProcessor(model_file=str(llama_sp_tokenizer / "tokenizer.model"))
    texts = [t.replace("<image>", "") for t in tokenizer_corpus()]
    texts += [" " + t for t in texts] + ["  two spaces", " ", "\nnewline first", "a  b   c", "Zebras 42°C! 中文"]
    for text in texts:
        assert tok.encode(text) == sp.encode(text), repr(text)
    assert tok.hf.convert_ids_to_tokens(tok.encode(" It")) != tok.hf.convert_ids_to_tokens(tok.encode("It"))


def test_sentencepiece_folder_without_sentencepiece_says_what_to_install(llama_sp_tokenizer, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "sentencepiece" else real_find_spec(name, *a)
    )
    with pytest.raises(DataError, match="SentencePiece model.*sentencepiece package: pip install sentencepiece$"):
        load_tokenizer(str(llama_sp_tokenizer))


def test_unloadable_folder_lists_its_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match=r"holds config.json, notes.txt; .*needs tokenizer.json, or a SentencePiece"):
        load_tokenizer(str(tmp_path))
