"""The shard builder: tar layout, skips, manifest, DALI indexes, determinism, resume, CLI."""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from megamod.data import shards
from megamod.cli.build_shards import main
from megamod.data.shards import build_shards
from tests.data.fixtures import build_fixture_shards, make_llava

REPO = Path(__file__).resolve().parents[2]
HAS_WDS2IDX = shards._find_wds2idx() is not None


def read_samples(out: Path) -> list[tuple[str, dict, dict[str, bytes]]]:
    """(key, json doc, {suffix: bytes}) of every sample, in shard and member order."""
    manifest = json.loads((out / "manifest.json").read_text())
    samples = []
    for shard in manifest["shards"]:
        with tarfile.open(out / shard["url"]) as tar:
            for member in tar.getmembers():
                key, _, suffix = member.name.partition(".")
                data = tar.extractfile(member).read()
                if suffix == "json":  # the json comes first in each sample
                    samples.append((key, json.loads(data), {}))
                else:
                    assert key == samples[-1][0]
                    samples[-1][2][suffix] = data
    return samples


def shard_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if not p.name.startswith(".")}


@pytest.mark.parametrize("fmt", ["llava", "mimicit"])
def test_shards_hold_the_valid_samples_with_original_bytes(tmp_path, fmt):
    fixture, out = build_fixture_shards(fmt, tmp_path, shard_size=3)
    manifest = json.loads((out / "manifest.json").read_text())
    n = len(fixture.expected)
    assert manifest["samples"] == n
    assert manifest["skipped"] == fixture.skipped
    assert [s["nsamples"] for s in manifest["shards"]] == [3] * (n // 3) + ([n % 3] if n % 3 else [])
    assert manifest["source"]["format"] == fmt
    assert manifest["max_images_per_sample"] == max(len(e.images) for e in fixture.expected)

    samples = read_samples(out)
    assert [key for key, _, _ in samples] == [f"s{i:09d}" for i in range(n)]
    for (key, doc, images), expected in zip(samples, fixture.expected):
        assert doc["id"] == expected.id and doc["source"] == fmt
        assert doc["images"] == expected.images == list(images)
        assert len(doc["conversations"]) == expected.turns
        assert sum(t["value"].count("<image>") for t in doc["conversations"]) == len(expected.images)
        assert {t["from"] for t in doc["conversations"]} <= {"human", "gpt"}
        assert list(images.values()) == expected.image_bytes  # not re-encoded
        assert [Image.open(io.BytesIO(b)).mode for b in images.values()] == expected.modes

    expected_files = {"manifest.json"} | {s["url"] for s in manifest["shards"]}
    if HAS_WDS2IDX:
        expected_files |= {s["index"] for s in manifest["shards"]}
        first = (out / manifest["shards"][0]["index"]).read_text().splitlines()
        assert first[0] == "v1.2 3" and first[1].startswith("json 512 ")
    assert set(shard_files(out)) == expected_files  # no temporary files left


def test_shards_read_with_dali_and_its_indexes(tmp_path):
    fixture, out = build_fixture_shards("llava", tmp_path, shard_size=3)
    manifest = json.loads((out / "manifest.json").read_text())
    urls = [str(out / s["url"]) for s in manifest["shards"]]

    dali = pytest.importorskip("nvidia.dali")
    if not HAS_WDS2IDX:
        pytest.skip("wds2idx not installed")

    @dali.pipeline_def(batch_size=len(fixture.expected), num_threads=1, device_id=None)
    def pipe():
        return tuple(dali.fn.readers.webdataset(
            paths=urls, index_paths=[str(out / s["index"]) for s in manifest["shards"]],
            ext=["json", "img0.jpg;img0.png", "img1.jpg;img1.png"], missing_component_behavior="empty"))

    p = pipe()
    p.build()
    docs, img0, img1 = p.run()
    assert [json.loads(bytes(docs.at(i)))["id"] for i in range(len(docs))] == [e.id for e in fixture.expected]
    for i, expected in enumerate(fixture.expected):
        got = [bytes(img0.at(i)), bytes(img1.at(i))][: len(expected.image_bytes)]
        assert got == expected.image_bytes


def test_shards_read_with_the_webdataset_library(tmp_path):
    """Other WebDataset tooling reads our shards: keys, json and image members intact."""
    import webdataset

    fixture, out = build_fixture_shards("llava", tmp_path, shard_size=3)
    manifest = json.loads((out / "manifest.json").read_text())
    urls = [str(out / s["url"]) for s in manifest["shards"]]
    samples = list(webdataset.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == [f"s{i:09d}" for i in range(len(samples))]
    assert [json.loads(s["json"])["id"] for s in samples] == [e.id for e in fixture.expected]
    for sample, expected in zip(samples, fixture.expected):
        assert [sample[name] for name in expected.images] == expected.image_bytes


def test_workers_do_not_change_the_output(tmp_path):
    _, serial = build_fixture_shards("llava", tmp_path / "a", shard_size=4)
    _, parallel = build_fixture_shards("llava", tmp_path / "b", shard_size=4, workers=2)
    a, b = shard_files(serial), shard_files(parallel)
    manifest_a, manifest_b = json.loads(a.pop("manifest.json")), json.loads(b.pop("manifest.json"))
    assert a == b  # byte-identical shards and indexes
    del manifest_a["source"], manifest_b["source"]  # only the paths differ
    assert manifest_a == manifest_b


def test_shard_bytes_max_samples_and_no_wds2idx(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "_find_wds2idx", lambda: None)
    fixture, out = build_fixture_shards("llava", tmp_path / "a", shard_bytes=250_000)
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["dali_index"] and "wds2idx" in manifest["notes"][0]
    assert not list(out.glob("*.idx")) and all("index" not in s for s in manifest["shards"])
    # Image bytes in order: 68k 35k 0 59k | 179k | 466k (alone, over the limit) | 112k 103k
    assert [s["nsamples"] for s in manifest["shards"]] == [4, 1, 1, 2]
    assert all(s["bytes"] <= 250_000 for i, s in enumerate(manifest["shards"]) if i != 2)

    fixture, out = build_fixture_shards("llava", tmp_path / "b", max_samples=4)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == 4
    assert [doc["id"] for _, doc, _ in read_samples(out)] == [e.id for e in fixture.expected[:4]]
    # Counted: only the records read before the 4th sample (truncated, missing).
    assert manifest["skipped"] == {"bad_image": 1, "missing_image": 1}


def test_an_interrupted_build_resumes_to_the_same_result(tmp_path, monkeypatch):
    fixture = make_llava(tmp_path / "src")
    args = ("llava", fixture.annotations, fixture.images)
    options = {"shard_size": 3, "workers": 0, "progress": False}
    build_shards(*args, tmp_path / "clean", **options)

    # Crash right after the 2nd shard is renamed into place, before it is recorded.
    finish, calls = shards._ShardWriter.finish, []

    def crash_on_second(self):
        entry = finish(self)
        calls.append(entry)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return entry

    out = tmp_path / "out"
    monkeypatch.setattr(shards._ShardWriter, "finish", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        build_shards(*args, out, **options)
    monkeypatch.undo()
    assert not (out / "manifest.json").exists()
    assert (out / "llava-000001.tar").exists()  # complete but unrecorded: must be redone
    first = (out / "llava-000000.tar").stat()
    # Leftovers a killed run and an earlier, longer build could leave.
    (out / "llava-000002.tar.tmp").write_bytes(b"half a shard")
    (out / "llava-000009.tar").write_bytes(b"stale")
    (out / "unrelated.txt").write_text("keep me")

    build_shards(*args, out, **options)
    again = (out / "llava-000000.tar").stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # kept, not rewritten
    files = shard_files(out)
    assert files.pop("unrelated.txt") == b"keep me"
    clean = shard_files(tmp_path / "clean")
    assert json.loads(files.pop("manifest.json")) == json.loads(clean.pop("manifest.json"))
    assert files == clean


def test_rerun_is_a_no_op_and_new_options_rebuild_cleanly(tmp_path):
    fixture, out = build_fixture_shards("llava", tmp_path, shard_size=3)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("llava-*")}
    assert len(before) == 3 * (2 if HAS_WDS2IDX else 1)
    manifest = (out / "manifest.json").read_text()

    build_shards("llava", fixture.annotations, fixture.images, out, shard_size=3, workers=0, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("llava-*")} == before
    assert (out / "manifest.json").read_text() == manifest

    build_shards("llava", fixture.annotations, fixture.images, out, shard_size=100, workers=0, progress=False)
    assert sorted(p.name for p in out.glob("llava-*")) == ["llava-000000.idx", "llava-000000.tar"][
        0 if HAS_WDS2IDX else 1 :
    ]
    assert json.loads((out / "manifest.json").read_text())["samples"] == len(fixture.expected)


def test_cli_exit_codes_and_messages(tmp_path, capsys):
    fixture = make_llava(tmp_path / "src")
    out = tmp_path / "out"
    base = ["--format", "llava", "--images", str(fixture.images), "--output", str(out), "--workers", "0"]

    assert main(base + ["--annotations", str(fixture.annotations), "--name", "mix", "--shard-size", "4"]) == 0
    assert "8 samples in 2 shards" in capsys.readouterr().out
    assert (out / "mix-000001.tar").exists()

    for annotations, message in [
        (tmp_path / "missing.json", "missing.json: cannot read it"),
        (tmp_path / "src" / "images", "cannot read it"),  # a folder
    ]:
        assert main(base + ["--annotations", str(annotations)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]

    cut = tmp_path / "cut.json"
    cut.write_text(fixture.annotations.read_text()[:2000])  # truncated mid-record
    assert main(base + ["--annotations", str(cut), "--output", str(tmp_path / "cut")]) == 2
    assert "cut.json: invalid JSON at byte" in capsys.readouterr().err

    bad_images = ["--images", str(tmp_path / "nowhere")]
    assert main(base + ["--annotations", str(fixture.annotations)] + bad_images) == 2
    assert "nowhere: not a folder" in capsys.readouterr().err


def test_tool_script_runs(tmp_path):
    fixture = make_llava(tmp_path / "src")
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "build_shards.py"), "--format", "llava", "--annotations",
         str(fixture.annotations), "--images", str(fixture.images), "--output", str(tmp_path / "out"),
         "--workers", "1"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "8 samples in 1 shards" in done.stdout
    assert "sample/s" in done.stderr  # the progress bar
