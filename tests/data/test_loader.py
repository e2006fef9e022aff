"""The shard loader: DP/TP slicing, exact resume, mixtures, bad samples, shard resolution, tiny.

Runs on the Pillow path (no DALI needed); `test_dali.py` checks DALI against it.
"""

import io
import json
import logging
import os
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from megamod.config import load_config
from megamod.data.decode import PythonImageDecoder
from megamod.data.loader import DataCounts, build_train_loader, prepare_tiny_shards
from megamod.data.reader import MIXTURE_BLOCK, SampleOrder, open_source
from megamod.data.tiny import tiny_samples
from megamod.data.tokenizer import load_tokenizer
from megamod.errors import ConfigError, DataError
from tests.data.fixtures import build_fixture_shards, image_bytes

N_LLAVA, N_MIMICIT = 8, 4  # good samples in the fixtures


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return build_fixture_shards("llava", tmp_path_factory.mktemp("llava"), shard_size=3)[1]


@pytest.fixture(scope="module")
def mimicit(tmp_path_factory):
    return build_fixture_shards("mimicit", tmp_path_factory.mktemp("mimicit"), shard_size=2)[1]


def config(shards=None, mixture=None, **data):
    overrides = [
        "model.vision.image_size=28", "model.vision.patch_size=14", "model.language.seq_length=512",
        "train.global_batch_size=8", "train.micro_batch_size=2",
        "data.image_decoder=python", "data.num_workers=2", "data.conversation_template=vicuna_v1",
    ]
    overrides += [f"data.{k}={v}" for k, v in data.items()]
    if shards is not None:
        overrides.append(f"data.train_shards={shards}")
    if mixture is not None:
        overrides.append("data.mixture=" + json.dumps([{"shards": str(s), "weight": w} for s, w in mixture]))
    return load_config(None, overrides)


def steps(loader, n):
    return [loader.next_step() for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for step_a, step_b in zip(a, b):
        assert len(step_a) == len(step_b)
        for mb_a, mb_b in zip(step_a, step_b):
            assert mb_a.keys() == mb_b.keys()
            for key in mb_a:
                assert torch.equal(mb_a[key], mb_b[key]), key


def rows(step):
    """Each row's sample tokens (its padding, which depends on its micro-batch, left out)."""
    return [tuple(row[~pad].tolist()) for mb in step for row, pad in zip(mb["tokens"], mb["padding_mask"])]


@pytest.mark.parametrize("padding", ["longest", "max_length"])
def test_batches_have_the_contract_shapes(llava, tok, padding):
    with build_train_loader(config(llava, padding=padding), tok, 0, 1) as loader:
        step = loader.next_step()
    assert len(step) == 4
    for mb in step:
        lengths = (~mb["padding_mask"]).sum(1)
        # Rows hold one sample each, then padding; `longest` cuts the micro-batch to its
        # longest sample rounded up to data.pad_to_multiple (8).
        assert torch.equal(mb["padding_mask"], torch.arange(mb["tokens"].shape[1]) >= lengths[:, None])
        width = 512 if padding == "max_length" else -(-int(lengths.max()) // 8) * 8
        assert width < 512 or padding == "max_length"
        assert mb["tokens"].shape == mb["labels"].shape == mb["loss_mask"].shape == (2, width)
        assert (mb["tokens"][mb["padding_mask"]] == tok.pad_id).all()
        assert mb["tokens"].dtype == mb["labels"].dtype == torch.int64 and mb["loss_mask"].dtype == torch.bool
        assert torch.equal(mb["loss_mask"], mb["labels"] != -100) and mb["loss_mask"].any(dim=1).all()
        assert not (mb["loss_mask"] & mb["padding_mask"]).any()
        n_runs = int((mb["tokens"] == tok.image_token_id).sum()) // 4  # 4 image tokens per image
        assert mb["images"].shape == (n_runs, 3, 28, 28) and mb["images"].dtype == torch.float32
    # One epoch of the fixture: 7 samples hold 8 images (text-only: 0, multi-image: 2).
    assert sum(len(mb["images"]) for mb in step) == 8
    assert len(set(rows(step))) == N_LLAVA


def test_dp_ranks_split_the_global_batch_and_tp_ranks_agree(llava, tok):
    cfg = config(llava, prefetch_steps=0)
    with build_train_loader(cfg, tok, 0, 1) as whole, build_train_loader(cfg, tok, 0, 2) as r0, \
            build_train_loader(cfg, tok, 1, 2) as r1, build_train_loader(cfg, tok, 1, 2) as r1_tp:
        for _ in range(3):
            full, first, second = whole.next_step(), r0.next_step(), r1.next_step()
            assert len(first) == len(second) == 2
            assert_same([first + second], [full])  # DP=2's union is DP=1's, position by position
            assert_same([second], [r1_tp.next_step()])  # a TP peer builds the same batches
        # A step is one epoch of the 8 samples: the two ranks' halves are disjoint.
        assert not set(rows(first)) & set(rows(second))


@pytest.mark.parametrize("mixed", [False, True])
def test_resume_gives_the_uninterrupted_batches(llava, mimicit, tok, mixed):
    # 6 samples a step over 8 (or 8 + 4): steps straddle epoch boundaries.
    cfg = config(**({"mixture": [(llava, 3), (mimicit, 1)]} if mixed else {"shards": llava}))
    cfg.train.global_batch_size = 6
    with build_train_loader(cfg, tok, 1, 3) as loader:
        first = steps(loader, 2)
        state = loader.state_dict()
        rest = steps(loader, 4)  # the prefetch thread ran ahead of the saved position
    assert state["consumed_samples"] == 12
    with build_train_loader(cfg, tok, 1, 3) as resumed:
        resumed.load_state_dict(state)
        assert_same(steps(resumed, 4), rest)
    with build_train_loader(cfg, tok, 1, 3) as again:  # and a fresh start repeats the run
        assert_same(steps(again, 2), first)


def test_mixture_order_follows_the_weights():
    sizes, weights = [100, 50, 7], [5.0, 3.0, 2.0]
    order = SampleOrder(sizes, weights, seed=7)
    n = 3 * MIXTURE_BLOCK + 1234
    located = [order.locate(p) for p in range(n)]
    sources = np.array([s for s, _ in located])
    for s, w in enumerate(weights):
        assert abs(np.mean(sources == s) - w / sum(weights)) < 0.002
        assert abs(np.mean(sources[:1000] == s) - w / sum(weights)) < 0.05  # mixed locally too
        # k counts the source's draws exactly, so a resume can compute it from the position.
        assert [k for src, k in located if src == s] == list(range(int(np.sum(sources == s))))
        epoch = [order.sample(s, k) for k in range(sizes[s])]
        assert sorted(epoch) == list(range(sizes[s]))  # each epoch is a permutation
        assert [order.sample(s, k) for k in range(sizes[s], 2 * sizes[s])] != epoch  # reshuffled
    other_seed = SampleOrder(sizes, weights, seed=8)
    assert [other_seed.locate(p) for p in range(100)] != located[:100]
    with pytest.raises(ConfigError, match=r"data.mixture\[1\].weight"):
        SampleOrder([10, 10], [1.0, 1e-6], seed=0)


def test_mixture_loader_draws_from_both_sources(llava, mimicit, tok):
    with build_train_loader(config(mixture=[(llava, 1), (mimicit, 1)]), tok, 0, 1) as loader:
        seen = {row for step in steps(loader, 4) for row in rows(step)}
        sources = [s.spec for s in loader.sources]
    with build_train_loader(config(llava), tok, 0, 1) as a, build_train_loader(config(mimicit), tok, 0, 1) as b:
        only_llava = {row for step in steps(a, 2) for row in rows(step)}
        only_mimicit = {row for step in steps(b, 2) for row in rows(step)}
    assert sources == [str(llava), str(mimicit)]
    assert seen & only_llava and seen & only_mimicit and seen <= only_llava | only_mimicit


def corrupt_member(shards: Path, name: str) -> None:
    """Overwrites a member's data in place (the tar and its .idx stay valid) with non-image bytes."""
    for path in sorted(shards.glob("*.tar")):
        with tarfile.open(path) as tar:
            member = next((m for m in tar if m.name == name), None)
        if member is not None:
            with open(path, "r+b") as f:
                f.seek(member.offset_data)
                f.write(b"\xff\xd8 not a jpeg" + b"\0" * (member.size - 12))
            return
    raise AssertionError(f"no member {name}")


@pytest.fixture
def corrupt(llava, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(llava, shards)
    corrupt_member(shards, "s000000000.img0.jpg")  # the astronaut caption sample
    return shards


@pytest.mark.parametrize("decoder", ["python", "dali"])
def test_a_corrupt_image_is_skipped_counted_logged_once_and_replaced(corrupt, tok, caplog, decoder):
    if decoder == "dali":
        pytest.importorskip("nvidia.dali")
    caplog.set_level(logging.WARNING, "megamod")
    with build_train_loader(config(corrupt, image_decoder=decoder, max_skip_fraction=0.2), tok, 0, 1) as loader:
        for step in steps(loader, 3):  # one epoch a step: the bad sample comes up every step
            assert [len(mb["tokens"]) for mb in step] == [2] * 4
            assert len(set(rows(step))) == N_LLAVA - 1  # the 7 good ones, one twice
        assert (loader.counts.skipped, loader.counts.seen) == (3, 27)
    warnings = [r.getMessage() for r in caplog.records if "s000000000" in r.getMessage()]
    assert len(warnings) == 1 and "llava-000000.tar:s000000000" in warnings[0], warnings


def test_truncated_samples_are_counted(llava, tok):
    """Reference: encode every json member of the shards directly; one step is one epoch."""
    from megamod.data.conversation import encode_conversation

    docs = []
    for shard in sorted(llava.glob("*.tar")):
        with tarfile.open(shard) as tar:
            docs += [json.load(tar.extractfile(m)) for m in tar if m.name.endswith(".json")]
    expected = sum(encode_conversation(d["conversations"], "vicuna_v1", tok, 4, 64).truncated for d in docs)
    assert 0 < expected < len(docs) == N_LLAVA
    with build_train_loader(config(llava), tok, 0, 1) as loader:  # seq_length 512: no cuts
        loader.next_step()
        assert loader.counts.truncated == 0
    short = load_config(None, [f"data.train_shards={llava}", "model.vision.image_size=28",
                               "model.vision.patch_size=14", "model.language.seq_length=64",
                               "train.global_batch_size=8", "train.micro_batch_size=2",
                               "data.image_decoder=python", "data.conversation_template=vicuna_v1"])
    with build_train_loader(short, tok, 0, 1) as loader:
        loader.next_step()
        assert (loader.counts.truncated, loader.counts.skipped) == (expected, 0)


def test_too_many_bad_samples_raise(corrupt, tok):
    # 1 in 8 is bad, 9 samples read a step: over a 10% limit once 10 / 0.1 = 100 are read.
    with build_train_loader(config(corrupt, max_skip_fraction=0.1), tok, 0, 1) as loader:
        steps(loader, 11)
        with pytest.raises(DataError, match=r"max_skip_fraction=0.1.*s000000000"):
            loader.next_step()


def write_shard(path: Path, samples: list[tuple[list[dict], list[bytes]]]) -> None:
    """A shard in the builder's layout, made by hand (no .idx: the loader scans it)."""
    with tarfile.open(path, "w") as tar:
        for i, (turns, images) in enumerate(samples):
            names = [f"img{j}.jpg" for j in range(len(images))]
            doc = {"id": str(i), "conversations": turns, "images": names}
            for name, data in [("json", json.dumps(doc).encode()), *zip(names, images)]:
                info = tarfile.TarInfo(f"k{i:04d}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def turns(question, answer, role="gpt"):
    return [{"from": "human", "value": question}, {"from": role, "value": answer}]


def test_invalid_conversations_are_skipped(tmp_path, tok, caplog):
    caplog.set_level(logging.WARNING, "megamod")
    good = [(turns("<image>\nWhat is it?", f"Answer {i}."), [image_bytes("chelsea")]) for i in range(5)]
    write_shard(tmp_path / "a.tar", good + [(turns("Hi?", "beep", role="robot"), [])])
    with build_train_loader(config(f"{tmp_path}/*.tar", max_skip_fraction=0.5), tok, 0, 1) as loader:
        step = loader.next_step()
        assert len(set(rows(step))) == 5 and loader.counts.skipped >= 1
    assert any("'robot'" in r.getMessage() and "a.tar:k0005" in r.getMessage() for r in caplog.records)


def test_a_broken_data_set_raises(tmp_path, tok):
    write_shard(tmp_path / "a.tar", [(turns("<image>\nWhat?", "It."), [b"not an image"])] * 3)
    with build_train_loader(config(str(tmp_path / "a.tar")), tok, 0, 1) as loader:
        with pytest.raises(DataError, match="unusable samples in a row"):
            loader.next_step()


def test_a_sequence_too_short_for_any_answer_names_the_length_not_the_data(llava, tok):
    cfg = config(llava, prefetch_steps=0)
    cfg.model.language.seq_length = 8  # shorter than one image's tokens plus an answer
    with build_train_loader(cfg, tok, 0, 1) as loader:
        with pytest.raises(DataError, match=r"model.language.seq_length=8 .*: raise model.language.seq_length"):
            loader.next_step()


def test_shard_specs_resolve(llava, tmp_path):
    def count(spec):
        return len(open_source(str(spec), "data.train_shards"))

    assert count(llava) == count(f"{llava}/*.tar") == count(f"{llava}/llava-{{000000..000002}}.tar") == N_LLAVA
    assert count(f"{llava}/llava-{{000000..000001}}.tar") == 6
    assert count(f"{llava}/llava-00000[12].tar") == 5
    # Without .idx files (nor manifest) the tars are scanned: the same members come back.
    bare = tmp_path / "bare"
    bare.mkdir()
    for tar in llava.glob("*.tar"):
        shutil.copy(tar, bare)
    with_idx, scanned = open_source(str(llava), "x"), open_source(f"{bare}/*.tar", "x")
    assert all(s.index is not None for s in with_idx.shards) and all(s.index is None for s in scanned.shards)
    stored = {}  # what tarfile reads: {key: {extension: bytes}}
    for tar_path in sorted(llava.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                stored.setdefault(key, {})[ext] = tar.extractfile(m).read()
    for i, (key, members) in enumerate(stored.items()):
        assert with_idx.read(i).members == scanned.read(i).members == members
        assert with_idx.read(i).key == key
    with pytest.raises(DataError, match=r"data.train_shards='.*nothing.*' matches no shard files"):
        count(tmp_path / "nothing-{0..3}.tar")
    with pytest.raises(DataError, match="no manifest.json"):
        count(bare)
    (bare / "manifest.json").write_text((llava / "manifest.json").read_text())
    os.truncate(bare / "llava-000001.tar", 1024)
    with pytest.raises(DataError, match="llava-000001.tar is missing or not the size"):
        count(bare)


def test_prepare_tiny_shards_is_idempotent(tmp_path, tok):
    out = prepare_tiny_shards(tmp_path)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert len(stamps) > 1
    assert prepare_tiny_shards(tmp_path) == out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == stamps
    assert len(open_source("tiny", "data.train_shards", tiny_dir=out)) == len(tiny_samples())
    with pytest.raises(DataError, match="data.train_shards=tiny: .*prepare_tiny_shards"):
        open_source("tiny", "data.train_shards", tiny_dir=tmp_path / "elsewhere")
    with build_train_loader(config(out), tok, 0, 1) as loader:
        assert len(loader.next_step()) == 4


def test_state_dict_and_counters(llava, tok, caplog):
    with build_train_loader(config(llava, prefetch_steps=0), tok, 0, 1) as loader:
        loader.next_step()
        assert loader.last_wait > 0 and loader.counts == DataCounts(seen=8)
        state = loader.state_dict()
    assert state == {"consumed_samples": 8, "order": {"seed": 1234, "sources": [[8, 1.0]]}}
    caplog.set_level(logging.WARNING, "megamod")
    with build_train_loader(config(llava, seed=5), tok, 0, 1) as other:
        other.load_state_dict({"consumed_samples": 8, "order": other.state_dict()["order"]})
        assert not caplog.records
        other.load_state_dict(state)
        assert other.consumed_samples == 8 and "differ from the checkpoint" in caplog.text


def test_config_fields(tmp_path):
    cfg = config(mixture=[("a", 2), ("b", 1)], max_skip_fraction=0.05)
    assert [(m.shards, m.weight) for m in cfg.data.mixture] == [("a", 2.0), ("b", 1.0)]
    assert cfg.data.train_shards == "tiny" and cfg.data.image_decoder == "python"
    with pytest.raises(ConfigError, match="both set"):
        config("x", mixture=[("a", 1)])
    with pytest.raises(ConfigError, match=r"data.mixture\[1\].weight=0.0"):
        config(mixture=[("a", 1), ("b", 0)])
    with pytest.raises(ConfigError, match=r"data.mixture\[0\].shards is empty"):
        load_config(None, ["data.mixture=[{weight: 1}]"])
    with pytest.raises(ConfigError, match=r"unknown config key data.mixture\[0\].path"):
        load_config(None, ["data.mixture=[{path: a}]"])
    with pytest.raises(ConfigError, match="max_skip_fraction"):
        config(max_skip_fraction=1.0)
    with pytest.raises(ConfigError, match="image_decoder"):
        config(image_decoder="gpu")


def test_without_dali_auto_uses_pillow_and_dali_is_a_config_error(llava, tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # as if DALI were not installed
    with build_train_loader(config(llava, image_decoder="auto"), tok, 0, 1) as loader:
        assert isinstance(loader.decoder, PythonImageDecoder)
    with pytest.raises(ConfigError, match="data.image_decoder=dali"):
        build_train_loader(config(llava, image_decoder="dali"), tok, 0, 1)


# ------------------------------------------------------------------------------ packing

def stream_samples(shards, tok, n, **data):
    """The stream's first n samples, each alone: (tokens, labels, images), unpadded."""
    cfg = config(shards, prefetch_steps=0, padding="longest", **data)
    cfg.train.global_batch_size = cfg.train.micro_batch_size = 1
    with build_train_loader(cfg, tok, 0, 1) as loader:
        samples = []
        for _ in range(n):
            (mb,) = loader.next_step()
            length = int((~mb["padding_mask"]).sum())
            samples.append((mb["tokens"][0, :length], mb["labels"][0, :length], mb["images"]))
    return samples


def first_fit(lengths, rows, row_length):
    """The packing rule, written out again: sample i into the first row with room; the step
    ends at the first sample no row has room for."""
    room, placed = [row_length] * rows, [[] for _ in range(rows)]
    for i, n in enumerate(lengths):
        fits = [r for r in range(rows) if room[r] >= n]
        if not fits:
            return placed, i
        room[fits[0]] -= n
        placed[fits[0]].append(i)
    raise AssertionError("the stream ran out before the step ended: read more samples")


def packed_config(shards, **data):
    cfg = config(shards, packing=True, prefetch_steps=0, **data)
    cfg.model.language.seq_length = 160
    cfg.train.global_batch_size, cfg.train.micro_batch_size = 4, 2
    return cfg


def test_packed_rows_hold_whole_samples_first_fit_in_stream_order(llava, tok):
    cfg = packed_config(llava)
    samples = stream_samples(llava, tok, 60)
    start = 0
    with build_train_loader(cfg, tok, 0, 1) as loader:
        for _ in range(3):
            step = loader.next_step()
            placed, consumed = first_fit([len(t) for t, _, _ in samples[start:]], 4, 160)
            assert loader.last_step_samples == consumed and loader.consumed_samples == start + consumed
            assert consumed > 4  # several samples a row: these samples are short
            rows = [row for mb in step for row in range(len(mb["tokens"]))]
            assert len(rows) == 4
            for r, expected in enumerate(placed):
                mb, row = step[r // 2], r % 2
                tokens = torch.cat([samples[start + i][0] for i in expected])
                labels = torch.cat([samples[start + i][1] for i in expected])
                n = len(tokens)
                assert torch.equal(mb["tokens"][row, :n], tokens)
                assert torch.equal(mb["labels"][row, :n], labels)  # no loss across samples
                assert (mb["padding_mask"][row, n:]).all() and not mb["padding_mask"][row, :n].any()
                assert (mb["segment_ids"][row, n:] == -1).all()
                assert torch.equal(mb["position_ids"][row, :n],
                                   torch.cat([torch.arange(len(samples[start + i][0])) for i in expected]))
                assert torch.equal(mb["segment_ids"][row, :n], torch.cat(
                    [torch.full((len(samples[start + i][0]),), j) for j, i in enumerate(expected)]))
            for m, mb in enumerate(step):  # images in row order, sample by sample
                order = [i for r in (2 * m, 2 * m + 1) for i in placed[r]]
                assert torch.equal(mb["images"], torch.cat([samples[start + i][2] for i in order]))
            start += consumed


def test_packed_rows_do_not_depend_on_the_dp_size_and_resume_exactly(llava, tok):
    cfg = packed_config(llava)
    with build_train_loader(cfg, tok, 0, 1) as whole:
        uninterrupted = steps(whole, 4)
    with build_train_loader(cfg, tok, 0, 2) as r0, build_train_loader(cfg, tok, 1, 2) as r1:
        for n in range(2):  # DP=2: rank r holds rows [2r, 2r + 2) of DP=1's step
            assert_same([r0.next_step() + r1.next_step()], [uninterrupted[n]])
        state = r1.state_dict()
        assert state == r0.state_dict()
    with build_train_loader(cfg, tok, 0, 1) as resumed:  # resumed at DP=1
        resumed.load_state_dict(state)
        assert_same(steps(resumed, 2), uninterrupted[2:])


def test_a_packed_sample_whose_image_fails_leaves_its_row(corrupt, tok):
    cfg = packed_config(corrupt, max_skip_fraction=0.9)
    with build_train_loader(cfg, tok, 0, 1) as loader:
        step = loader.next_step()
        skipped = loader.counts.skipped
    assert skipped >= 1
    for mb in step:  # every image placeholder run left has its decoded image
        assert int((mb["tokens"] == tok.image_token_id).sum()) == 4 * len(mb["images"])
        # The failed sample's positions are padding: no loss, segment -1.
        assert not (mb["loss_mask"] & mb["padding_mask"]).any()
        assert torch.equal(mb["padding_mask"], mb["segment_ids"] < 0)


def test_group_by_length_sorts_each_steps_samples_and_pads_less(llava, tok):
    plain_cfg, grouped_cfg = config(llava, prefetch_steps=0), config(llava, prefetch_steps=0, group_by_length=True)
    with build_train_loader(plain_cfg, tok, 0, 1) as plain, build_train_loader(grouped_cfg, tok, 0, 1) as grouped:
        for _ in range(2):
            a, b = plain.next_step(), grouped.next_step()
            assert sorted(rows(a)) == sorted(rows(b))  # the same samples, reordered
            lengths = [len(row) for row in rows(b)]
            assert lengths == sorted(lengths, reverse=True)
            assert sum(mb["tokens"].numel() for mb in b) <= sum(mb["tokens"].numel() for mb in a)
        assert plain.state_dict() == grouped.state_dict()
