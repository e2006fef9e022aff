"""The shard builder: annotations + images -> WebDataset tar shards (`megamod build-shards`,
`megamod.cli.build_shards`, is its command line).

    megamod build-shards --format {llava,mimicit} --annotations FILE --images PATH --output DIR
        [--name NAME] [--shard-size N] [--shard-bytes N] [--max-samples N] [--workers N]
        [--max-image-bytes N] [--max-image-pixels N] [--force]

Output in DIR:
- `NAME-000000.tar`, ...: sample k (counted over the whole build) is the tar key
  `s%09d` (original ids may hold dots and slashes, which break WebDataset keys) with members
  `KEY.json` then `KEY.img0.EXT`, `KEY.img1.EXT`, ... one per image in order, holding the
  original bytes; EXT (jpg, png, gif, ...) is the format found by decoding, not the file name.
  The json is `{"id": original id, "source": "llava"|"mimicit", "conversations":
  [{"from": "human"|"gpt", "value": str}, ...], "images": ["img0.jpg", ...]}` with one
  `<image>` marker per image, in order.
- `NAME-000000.idx`, ...: the DALI index of each shard, made by `wds2idx` (shipped with
  nvidia-dali) when it is installed; otherwise none, and the manifest says so.
- `manifest.json`, written last: `{"samples", "shards": [{"url", "nsamples", "bytes",
  "index"?}], "skipped": {reason: count}, "skipped_examples", "image_formats": {ext: count},
  "max_images_per_sample", "source", ...}`.
  Its presence means the build is complete.

Robustness: every image is decoded once (in worker processes, results kept in record
order); a sample with a missing or broken image, an empty conversation, a bad record or
mismatched `<image>` markers is skipped and counted by reason. So is one whose image path
leads out of the --images folder (`..`, an absolute path, a symlink), is not a regular
file, or is over --max-image-bytes or --max-image-pixels (the training loader's limits,
`data.max_image_*`, by default; pixels read from the header before decoding): see
`megamod.data.formats`. Only unusable inputs fail the run (`DataError`, exit code 2): an
unreadable or structurally broken annotations file or MIMIC-IT image JSON, a missing
--images folder, an --output that cannot be created or that holds something else.

Resuming: shards are written to `*.tmp` names and renamed when complete, then recorded in
the hidden progress file `.NAME.progress.json` with the counters up to that point and the
number of annotation records they cover. A rerun with the same inputs and options keeps the
recorded shards whose files are intact (same size), deletes every other
`NAME-NNNNNN.{tar,idx}[.tmp]` (half-written, unrecorded, or left by an earlier build with
more shards) and continues from the next record, so its result is byte-identical to an
uninterrupted run's. Changed files or options (not --workers) of the same data set (same
--name, --format, --annotations and --images paths) start over.

One data set per DIR (manifest.json describes one): a DIR that holds anything else (another
data set's build, or other files) is refused, so that a second build never silently
replaces the first one's manifest; `force=True` (--force) replaces it, deleting that other
build's shards, indexes and progress file (other files are left alone). Memory stays
bounded: the annotations are streamed (`megamod.data.formats`) and at most a few chunks of
samples are in flight.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path

from tqdm import tqdm

from megamod.config import DataConfig
from megamod.data import formats
from megamod.data.decode import ImageLimits, ImageTooLarge
from megamod.data.formats import BAD_IMAGE, IMAGE_TOO_LARGE, MISSING_IMAGE, Sample, Skipped, SkipRecord
from megamod.errors import DataError

FORMATS = ("llava", "mimicit")
MANIFEST = "manifest.json"
LAYOUT_VERSION = 1  # part of the resume fingerprint: a rerun never mixes layouts
DEFAULT_SHARD_SIZE = 1000
DEFAULT_SHARD_BYTES = 1 << 30
_CHUNK = 16  # samples per worker task: large enough to amortise pickling, small for order
_MAX_EXAMPLES = 5  # skipped samples named per reason in the manifest

# PIL format -> member extension where it is not the lowercase name (png, gif, webp, bmp,
# tiff ...). MPO is a JPEG with extra frames (many phone photos).
_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "JPEG2000": "jp2"}


def image_extension(data: bytes, limits: ImageLimits) -> str:
    """Decodes an encoded image fully (catching truncation) and returns its extension.
    Raises ImageTooLarge (before decoding) for one over `limits`' pixels."""
    # PIL's plugins signal corrupt data with many exception types (OSError, SyntaxError,
    # ValueError, EOFError, struct.error ...): all mean "bad image".
    try:
        with limits.open(io.BytesIO(data)) as image:
            image.load()
            return _EXTENSIONS.get(image.format, str(image.format).lower())
    except ImageTooLarge:
        raise
    except Exception as e:
        raise ValueError(f"{type(e).__name__}: {e}") from None


@dataclass
class Encoded:
    """A validated sample: its json document and its image members (suffix, bytes)."""

    doc: dict
    images: list[tuple[str, bytes]]


def encode_sample(sample: Sample, limits: ImageLimits) -> Encoded | Skipped:
    """Reads and decodes each image of a sample once; returns its members or why it is skipped."""
    images = []
    for i, ref in enumerate(sample.images):
        try:
            data = ref.read(limits.max_bytes)
        except SkipRecord as skip:
            return Skipped(sample.id, skip.reason, skip.detail)
        except FileNotFoundError:
            return Skipped(sample.id, MISSING_IMAGE, f"{ref.name} not found")
        except (OSError, ValueError) as e:
            return Skipped(sample.id, BAD_IMAGE, f"{ref.name}: {e}")
        try:
            images.append((f"img{i}.{image_extension(data, limits)}", data))
        except ImageTooLarge as e:
            return Skipped(sample.id, IMAGE_TOO_LARGE, f"{ref.name}: {e}")
        except ValueError as e:
            return Skipped(sample.id, BAD_IMAGE, f"{ref.name}: {e}")
    doc = {"id": sample.id, "source": sample.source, "conversations": sample.conversations,
           "images": [suffix for suffix, _ in images]}
    return Encoded(doc, images)


def _encode_chunk(
    limits: ImageLimits, chunk: list[tuple[int, Sample | Skipped]]
) -> list[tuple[int, Encoded | Skipped]]:
    return [(i, encode_sample(r, limits) if isinstance(r, Sample) else r) for i, r in chunk]


def _encode_in_order(
    records: Iterable[tuple[int, Sample | Skipped]], workers: int, limits: ImageLimits
) -> Iterator[tuple[int, Encoded | Skipped]]:
    """encode_sample over the records, in their order, on `workers` processes (0: here).

    At most 2 x workers chunks are in flight, so memory does not depend on how far the
    decoding runs ahead of the writing.
    """
    records = iter(records)
    chunks = iter(lambda: list(islice(records, _CHUNK)), [])
    encode = partial(_encode_chunk, limits)
    if workers == 0:
        for chunk in chunks:
            yield from encode(chunk)
        return
    with ProcessPoolExecutor(workers) as pool:
        pending = deque()
        try:
            for chunk in chunks:
                pending.append(pool.submit(encode, chunk))
                if len(pending) >= 2 * workers:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def _tar_size(n: int) -> int:
    """Bytes one member of n bytes takes in a tar: a header block plus whole data blocks."""
    return 512 + -(-n // 512) * 512


class _ShardWriter:
    """Writes one shard under a temporary name; `finish` indexes it and renames it into place."""

    def __init__(self, out: Path, stem: str, wds2idx: str | None):
        self.tar = out / f"{stem}.tar"
        self.idx = out / f"{stem}.idx" if wds2idx else None
        self._wds2idx = wds2idx
        self._tmp = self.tar.with_name(self.tar.name + ".tmp")
        self._file = open(self._tmp, "wb")
        self._archive = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.samples = self.bytes = 0

    def add(self, members: list[tuple[str, bytes]], size: int) -> None:
        for name, data in members:
            # TarInfo's fixed defaults (mtime 0, uid 0, mode 0644): a rebuild is byte-identical.
            info = tarfile.TarInfo(name)
            info.size = len(data)
            self._archive.addfile(info, io.BytesIO(data))
        self.samples += 1
        self.bytes += size

    def finish(self) -> dict:
        """Completes the shard and moves it into place; returns its manifest entry."""
        self._archive.close()
        self._file.flush()
        os.fsync(self._file.fileno())  # the final name must never point at unwritten data
        self._file.close()
        entry = {"url": self.tar.name, "nsamples": self.samples, "bytes": self._tmp.stat().st_size}
        if self.idx is not None:
            tmp_idx = self.idx.with_name(self.idx.name + ".tmp")
            done = subprocess.run([self._wds2idx, str(self._tmp), str(tmp_idx)], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"wds2idx failed on {self._tmp}: {done.stderr.strip()}")
            os.replace(tmp_idx, self.idx)  # before the tar: a final tar always has its index
            entry["index"] = self.idx.name
        os.replace(self._tmp, self.tar)
        return entry

    def abort(self) -> None:
        self._archive.close()
        self._file.close()
        self._tmp.unlink(missing_ok=True)


@dataclass
class _State:
    """What the shards so far cover; saved after each shard, so a rerun can continue."""

    next_record: int = 0  # annotation records [0, next_record) are accounted for
    samples: int = 0
    shards: list[dict] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)
    image_formats: dict[str, int] = field(default_factory=dict)
    max_images: int = 0  # the most images one sample has: a DALI reader needs one output each
    finished: bool = False

    def skip(self, item: Skipped) -> None:
        self.skipped[item.reason] = self.skipped.get(item.reason, 0) + 1
        examples = self.skipped_examples.setdefault(item.reason, [])
        if len(examples) < _MAX_EXAMPLES:
            examples.append(f"{item.id}: {item.detail}")


def _find_wds2idx() -> str | None:
    """DALI's index tool: on PATH, or beside this Python (a venv not activated)."""
    beside = Path(sys.executable).parent / "wds2idx"
    return shutil.which("wds2idx") or (str(beside) if beside.is_file() else None)


def _write_json_atomic(path: Path, obj: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _file_stamp(path: Path, flag: str) -> list[int]:
    try:
        stat = path.stat()
    except OSError as e:
        raise DataError(f"{flag} {path}: cannot read it ({e.strerror}); check the path") from None
    return [stat.st_size, stat.st_mtime_ns] if path.is_file() else []


def _resume(progress: Path, out: Path, fingerprint: dict) -> _State:
    """The saved state if it was made with the same fingerprint and its shards are intact,
    else a fresh one (the build then starts over)."""
    try:
        saved = json.loads(progress.read_text())
    except (OSError, ValueError):
        return _State()
    if not isinstance(saved, dict) or saved.get("fingerprint") != fingerprint:
        return _State()
    state = _State(**saved["state"])
    for shard in state.shards:
        tar = out / shard["url"]
        # Size, not a checksum: hashing ~100 GB on every rerun would cost more than it saves.
        if not tar.is_file() or tar.stat().st_size != shard["bytes"]:
            return _State()
        if "index" in shard and not (out / shard["index"]).is_file():
            return _State()
    return state


def _data_set(fmt: str, name: str, annotations: str, images: str) -> dict:
    """What makes a build the same data set's: a rerun of it resumes or rebuilds it."""
    return {"name": name, "format": fmt, "annotations": annotations, "images": images}


def _builds_in(out: Path) -> list[dict]:
    """The data sets whose builds `out` records (progress files, manifest.json), each once
    (a finished build keeps its progress file beside the manifest); one whose record does
    not parse counts as an unknown data set of that name."""
    builds = []
    for path in out.glob(".*.progress.json"):
        name = path.name[1 : -len(".progress.json")]
        try:
            f = json.loads(path.read_text())["fingerprint"]
            builds.append(_data_set(f["format"], f["name"], f["annotations"][0], f["images"][0]))
        except (OSError, ValueError, TypeError, KeyError, IndexError):
            builds.append(_data_set("?", name, "?", "?"))
    if (out / MANIFEST).is_file():
        try:
            m = json.loads((out / MANIFEST).read_text())
            source = m["source"]
            builds.append(_data_set(source["format"], m["name"], source["annotations"], source["images"]))
        except (OSError, ValueError, TypeError, KeyError):
            builds.append(_data_set("?", "?", "?", "?"))
    return [b for i, b in enumerate(builds) if b not in builds[:i]]


def _claim_output(out: Path, data_set: dict, force: bool) -> None:
    """Refuses (DataError) an output folder holding anything but `data_set`'s own build (a
    second data set would replace the first one's manifest); with `force`, deletes the
    other builds' files instead (other files stay)."""
    if not out.is_dir():
        return
    builds = _builds_in(out)
    others = [b for b in builds if b != data_set]
    names = {b["name"] for b in builds} | {data_set["name"]}
    own_files = re.compile(
        r"manifest\.json(\.tmp)?|" + "|".join(
            rf"\.{re.escape(n)}\.progress\.json(\.tmp)?|{re.escape(n)}-\d{{6}}\.(tar|idx)(\.tmp)?" for n in names))
    strangers = sorted(p.name for p in out.iterdir() if not own_files.fullmatch(p.name))
    if not others and (data_set in builds or not strangers):
        return
    if force:
        for build in others:
            _remove_stale(out, build["name"], [])
            (out / f".{build['name']}.progress.json").unlink(missing_ok=True)
        return
    if others:
        held = "; ".join(f"data set {b['name']!r} ({b['format']}, from {b['annotations']})" for b in others)
        what = f"the shards of another build: {held}"
    else:
        what = f"other files ({', '.join(strangers[:3])}{', ...' if len(strangers) > 3 else ''})"
    raise DataError(
        f"--output {out} already holds {what}. A folder holds one data set (its manifest.json "
        f"would be replaced, and training would see only the new one): write to another --output "
        f"(data.mixture combines data sets), pass --force to replace what is there, or rerun that "
        f"build with its own --name, --annotations and --images to resume it"
    )


def _remove_stale(out: Path, name: str, keep: list[dict]) -> None:
    """Deletes this build's shard, index and temporary files that `keep` does not list."""
    kept = {shard[k] for shard in keep for k in ("url", "index") if k in shard}
    pattern = re.compile(re.escape(name) + r"-\d{6}\.(tar|idx)(\.tmp)?")
    for path in out.iterdir():
        if pattern.fullmatch(path.name) and path.name not in kept:
            path.unlink()


def build_shards(
    fmt: str,
    annotations: str | Path,
    images: str | Path,
    output: str | Path,
    *,
    name: str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    max_samples: int | None = None,
    workers: int | None = None,
    progress: bool = True,
    max_image_bytes: int = DataConfig.max_image_bytes,
    max_image_pixels: int = DataConfig.max_image_pixels,
    force: bool = False,
) -> dict:
    """Builds (or resumes building) the shards of one data set; returns the manifest.

    `images` is the folder LLaVA's "image" paths are relative to, or MIMIC-IT's image JSON.
    A shard holds at most `shard_size` samples and, unless one sample alone is larger,
    `shard_bytes` bytes. `max_samples` stops after that many samples are written. `workers`
    decoding processes (default: one per CPU; 0 decodes in this process) do not change the
    output. Images over `max_image_bytes` or `max_image_pixels` are skipped. Raises
    DataError for an unreadable annotations or image JSON file, and for an `output` that
    holds anything but this data set's build, unless `force` (see the module docstring).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {FORMATS}")
    if min(shard_size, shard_bytes, max_image_bytes, max_image_pixels, max_samples or 1) < 1:
        raise ValueError("shard_size, shard_bytes, max_samples and the image limits must be >= 1")
    limits = ImageLimits(max_image_pixels, max_image_bytes, "--max-image-pixels", "--max-image-bytes")
    annotations, images, out = Path(annotations).resolve(), Path(images).resolve(), Path(output).resolve()
    name = name or annotations.stem
    workers = (os.cpu_count() or 1) if workers is None else workers
    wds2idx = _find_wds2idx()
    if fmt == "llava" and not images.is_dir():
        raise DataError(f"--images {images}: not a folder; for llava pass the folder the 'image' paths are relative to")
    if fmt == "mimicit" and not images.is_file():
        raise DataError(f"--images {images}: not a file; for mimicit pass the image JSON (image id -> base64)")
    if annotations.is_dir():
        raise DataError(f"--annotations {annotations}: cannot read it (a folder); give the annotations JSON file")
    fingerprint = {
        "layout_version": LAYOUT_VERSION, "format": fmt, "name": name,
        "annotations": [str(annotations), *_file_stamp(annotations, "--annotations")],
        "images": [str(images), *_file_stamp(images, "--images")],
        "shard_size": shard_size, "shard_bytes": shard_bytes, "max_samples": max_samples,
        "max_image_bytes": max_image_bytes, "max_image_pixels": max_image_pixels,
        "dali_index": wds2idx is not None,
    }
    _claim_output(out, _data_set(fmt, name, str(annotations), str(images)), force)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--output {out}: cannot create it ({e.strerror}); pick a writable folder") from None
    progress_file = out / f".{name}.progress.json"
    state = _resume(progress_file, out, fingerprint)
    _remove_stale(out, name, state.shards)

    def save() -> None:
        _write_json_atomic(progress_file, {"fingerprint": fingerprint, "state": asdict(state)})

    if not state.finished:
        (out / MANIFEST).unlink(missing_ok=True)  # until it is rewritten, the build is incomplete
        save()
        if fmt == "llava":
            records = formats.read_llava(annotations, images)
        else:
            if progress:
                print(f"indexing the images of {images} ...", file=sys.stderr)
            records = formats.read_mimicit(annotations, images)
        todo = islice(enumerate(records), state.next_record, None)
        _write_shards(_encode_in_order(todo, workers, limits), state, save, out, name, wds2idx,
                      shard_size, shard_bytes, max_samples, progress)

    manifest = {
        "samples": state.samples,
        "shards": state.shards,
        "skipped": state.skipped,
        "skipped_examples": state.skipped_examples,
        "image_formats": state.image_formats,
        "max_images_per_sample": state.max_images,
        "source": {"format": fmt, "annotations": str(annotations), "images": str(images)},
        "name": name,
        "dali_index": wds2idx is not None,
        "notes": [] if wds2idx else ["wds2idx (nvidia-dali) not found: no .idx files; DALI infers them, slower"],
    }
    _write_json_atomic(out / MANIFEST, manifest)
    return manifest


def _write_shards(
    results: Iterator[tuple[int, Encoded | Skipped]], state: _State, save: Callable[[], None], out: Path, name: str,
    wds2idx: str | None, shard_size: int, shard_bytes: int, max_samples: int | None, progress: bool,
) -> None:
    """The build loop: counts skips, cuts shards, saves the state after each shard."""
    writer = None
    bar = tqdm(desc=name, unit="sample", initial=state.samples, total=max_samples, disable=not progress,
               mininterval=1.0, dynamic_ncols=True)
    try:
        for index, result in results:
            if isinstance(result, Skipped):
                state.skip(result)
                bar.set_postfix(skipped=sum(state.skipped.values()), refresh=False)
            else:
                key = f"s{state.samples:09d}"
                members = [(f"{key}.json", json.dumps(result.doc, ensure_ascii=False).encode())]
                members += [(f"{key}.{suffix}", data) for suffix, data in result.images]
                size = sum(_tar_size(len(data)) for _, data in members)
                # Cut lazily, when a sample does not fit: the state then covers exactly the
                # records before this one, which is where a resumed run picks up.
                if writer and (writer.samples == shard_size or writer.bytes + size > shard_bytes):
                    state.shards.append(writer.finish())
                    writer = None
                    save()
                if writer is None:
                    writer = _ShardWriter(out, f"{name}-{len(state.shards):06d}", wds2idx)
                writer.add(members, size)
                state.samples += 1
                for suffix, _ in result.images:
                    ext = suffix.partition(".")[2]
                    state.image_formats[ext] = state.image_formats.get(ext, 0) + 1
                state.max_images = max(state.max_images, len(result.images))
                bar.update()
            state.next_record = index + 1
            if state.samples == max_samples:
                break
        if writer:
            state.shards.append(writer.finish())
            writer = None
        state.finished = True
        save()
    finally:
        if writer:
            writer.abort()
        results.close()  # stops the workers when max_samples ends the run early
        bar.close()
