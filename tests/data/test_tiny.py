"""The bundled tiny data set: written files, their content, and that every sample encodes."""

import json
import threading

import pytest
from PIL import Image

from megamod.data.conversation import encode_conversation
from megamod.data.preprocess import preprocess_image
from megamod.data.tiny import JSON_NAME, write_tiny_dataset
from megamod.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    json_path = write_tiny_dataset(out)
    return out, json_path, json.loads(json_path.read_text())


def image_list(sample):
    image = sample.get("image", [])
    return [image] if isinstance(image, str) else image


def test_json_and_images(written):
    out, json_path, samples = written
    assert json_path == out / JSON_NAME
    assert 40 <= len(samples) <= 60 and len({s["id"] for s in samples}) == len(samples)
    files = {f for s in samples for f in image_list(s)}
    assert 8 <= len(files) <= 10
    modes = set()
    for f in files:
        with Image.open(out / f) as image:
            image.load()
            modes.add(image.mode)
            assert preprocess_image(image, 32).shape == (3, 32, 32)
    assert {"RGB", "L", "RGBA"} <= modes
    assert {f.rsplit(".", 1)[1] for f in files} == {"jpg", "png"}
    counts = [len(image_list(s)) for s in samples]
    assert counts.count(0) >= 2 and max(counts) == 2  # text-only and multi-image samples
    assert sum(len(s["conversations"]) > 2 for s in samples) >= 3  # multi-turn
    for s in samples:
        assert sum(t["value"].count("<image>") for t in s["conversations"]) == len(image_list(s))


@pytest.mark.parametrize("template", ["plain", "vicuna_v1", "llama3"])
def test_every_sample_encodes_without_truncation(written, template):
    tok = load_tokenizer("tiny")
    for s in written[2]:
        enc = encode_conversation(s["conversations"], template, tok, num_image_tokens=16, seq_length=256)
        assert not enc.truncated and enc.num_images == len(image_list(s)), s["id"]
        assert (enc.labels != -100).any(), s["id"]


def snapshot(root):
    return {p.relative_to(root): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_rewrite_is_idempotent_and_repairs(written):
    out = written[0]
    before = snapshot(out)
    write_tiny_dataset(out)
    assert snapshot(out) == before  # same bytes, and not even rewritten (readers are undisturbed)

    logo = out / "images" / "logo.png"
    logo.write_bytes(b"torn")
    write_tiny_dataset(out)
    assert logo.read_bytes() == before[logo.relative_to(out)][0]


def test_concurrent_writers(written, tmp_path):
    threads = [threading.Thread(target=write_tiny_dataset, args=(tmp_path,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = {k: v[0] for k, v in snapshot(tmp_path).items()}  # no temp files left behind
    assert got == {k: v[0] for k, v in snapshot(written[0]).items()}
