"""Readers of the public annotation formats, yielding normalised samples one record at a time.

- `read_llava`: LLaVA's JSON array (`blip_laion_cc_sbu_558k.json`, `llava_v1_5_mix665k.json`):
  `[{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value"}, ...]}, ...]`,
  "image" a path (or a list of paths) relative to the images folder, absent for text-only.
- `read_mimicit`: MIMIC-IT's instruction JSON (`{"data": {id: {"instruction", "answer",
  "image_ids", "rel_ins_ids"}}}`) with its image JSON (`{image_id: base64}`), indexed once by
  `index_base64_images`.

Both files can be larger than memory (the 665k mix is ~1 GB of JSON, a MIMIC-IT image JSON
many GB), so they are streamed by `JsonScanner`, which parses one record at a time from a
window of the file: a broken record is skipped (`bad_record`) and the scan goes on. MIMIC-IT
images are not loaded: a first pass (`index_base64_images`) keeps each image's byte range
in the image JSON and an `ImageRef` reads it when needed, so the memory is one
(offset, length) per image id.

Every reader yields, per record and in file order, either a `Sample` (conversation normalised,
images not yet read) or a `Skipped` with one of the `SKIP_REASONS`. Reading and validating
the image bytes is the shard builder's job (`megamod.data.shards`).

A LLaVA image path stays inside the images folder: `ImageRef.read` resolves it (`..`,
an absolute path, symlinks) and refuses one that leads outside (`image_outside_images`),
reads regular files only (a FIFO would block, `/dev/zero` never end) and at most
`max_bytes` (`image_too_large`): an annotation file must not make the builder copy
`/etc/passwd` into a shard.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from megamod.errors import DataError

IMAGE_MARKER = "<image>"

BAD_RECORD = "bad_record"  # not valid JSON, or not the format's schema
EMPTY_CONVERSATION = "empty_conversation"  # no turns, or no non-blank answer to learn from
IMAGE_MARKER_MISMATCH = "image_marker_mismatch"  # number of <image> markers != number of images
MISSING_IMAGE = "missing_image"  # file (or MIMIC-IT image id) not found
BAD_IMAGE = "bad_image"  # unreadable, truncated, not a regular file or not an image
IMAGE_OUTSIDE_IMAGES = "image_outside_images"  # the path leads out of the images folder
IMAGE_TOO_LARGE = "image_too_large"  # over the byte or pixel limit
SKIP_REASONS = (BAD_RECORD, EMPTY_CONVERSATION, IMAGE_MARKER_MISMATCH, MISSING_IMAGE, BAD_IMAGE,
                IMAGE_OUTSIDE_IMAGES, IMAGE_TOO_LARGE)

_ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


@dataclass(frozen=True)
class ImageRef:
    """Where one image's bytes are: a whole file, or a base64 JSON string inside a file."""

    name: str  # as the annotation names it (relative path or image id), for messages
    path: str
    offset: int = -1  # >= 0: the base64 text is bytes [offset, offset + length) of `path`
    length: int = 0
    root: str | None = None  # a resolved folder the file must resolve into (LLaVA's images)

    def read(self, max_bytes: int) -> bytes:
        """The image's encoded bytes, at most `max_bytes`. Raises SkipRecord for a path out
        of `root` or a larger image, OSError (FileNotFoundError: missing) for a file that
        is not a readable regular file, ValueError for bad base64."""
        if self.offset >= 0:
            if self.length * 3 // 4 > max_bytes:  # base64: 4 characters per 3 bytes
                raise SkipRecord(IMAGE_TOO_LARGE, f"{self.name}: over {max_bytes:,} bytes")
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                return decode_base64(f.read(self.length))
        path, flags = self.path, os.O_RDONLY | os.O_NONBLOCK  # a FIFO opens at once; fstat refuses it
        if self.root is not None:
            path = os.path.realpath(path)
            if os.path.commonpath([path, self.root]) != self.root:
                raise SkipRecord(IMAGE_OUTSIDE_IMAGES, f"{self.name} resolves to {path}, outside {self.root}")
            flags |= os.O_NOFOLLOW  # no symlink may have replaced the resolved file since
        fd = os.open(path, flags)
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise OSError("not a regular file")
            if info.st_size > max_bytes:
                raise SkipRecord(IMAGE_TOO_LARGE, f"{self.name}: {info.st_size:,} bytes, over {max_bytes:,}")
            data = f.read(max_bytes + 1)  # the file may have grown since fstat
        if len(data) > max_bytes:
            raise SkipRecord(IMAGE_TOO_LARGE, f"{self.name}: over {max_bytes:,} bytes")
        return data


@dataclass
class Sample:
    """One training sample: `<image>` markers in the human turns match `images`, in order."""

    id: str
    source: str  # "llava" | "mimicit"
    conversations: list[dict[str, str]]  # [{"from": "human"|"gpt", "value": str}, ...]
    images: list[ImageRef]


@dataclass
class Skipped:
    """A record that cannot become a sample, and why."""

    id: str
    reason: str  # one of SKIP_REASONS
    detail: str


class SkipRecord(Exception):
    """Raised while normalising a record that cannot become a sample."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def decode_base64(raw: bytes) -> bytes:
    """Decodes a base64 JSON string's content: standard or URL-safe alphabet (Otter, MIMIC-IT's
    reference loader, uses `urlsafe_b64decode`), padding optional, JSON escapes (`\\/`) allowed."""
    if b"\\" in raw:
        raw = json.loads(b'"' + raw + b'"').encode("ascii")
    raw = b"".join(raw.split())
    raw += b"=" * (-len(raw) % 4)
    try:
        return base64.b64decode(raw, altchars=b"-_", validate=False)
    except binascii.Error as e:
        raise ValueError(f"bad base64: {e}") from e


def normalise_conversation(turns: object, n_images: int) -> list[dict[str, str]]:
    """Checks a LLaVA-style turn list and returns it as [{"from": "human"|"gpt", "value"}];
    raises SkipRecord with the reason when it cannot be a sample with `n_images` images."""
    if not isinstance(turns, list):
        raise SkipRecord(BAD_RECORD, "'conversations' is not a list")
    out = []
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise SkipRecord(BAD_RECORD, "a turn is not {'from': ..., 'value': str}")
        role = _ROLES.get(turn.get("from"))  # type: ignore[arg-type]
        if role is None:
            raise SkipRecord(BAD_RECORD, f"unknown role {turn.get('from')!r}")
        out.append({"from": role, "value": turn["value"]})
    if not any(t["from"] == "gpt" and t["value"].strip() for t in out):
        raise SkipRecord(EMPTY_CONVERSATION, "no turns" if not out else "no non-empty gpt turn")
    # Every turn counts: a marker in an answer would be expanded into image tokens too.
    markers = sum(t["value"].count(IMAGE_MARKER) for t in out)
    if markers != n_images:
        raise SkipRecord(IMAGE_MARKER_MISMATCH, f"{markers} {IMAGE_MARKER} markers for {n_images} images")
    return out


def read_llava(annotations: Path, images: Path) -> Iterator[Sample | Skipped]:
    """Yields one item per record of a LLaVA JSON array, in order. An unreadable file or one
    that is not a JSON array raises DataError here, before the first item."""
    scanner = JsonScanner(annotations)
    if scanner.peek() != "[":
        scanner.close()
        raise DataError(f"{annotations}: expected a JSON array of LLaVA records; check --format")
    return _llava_items(scanner, Path(os.path.realpath(images)))


def _llava_items(scanner: JsonScanner, images: Path) -> Iterator[Sample | Skipped]:
    with scanner:
        for index in scanner.array_items():
            try:
                record = scanner.value()[2]
            except BadJson as e:
                yield Skipped(f"record {index}", BAD_RECORD, str(e))
                continue
            yield _llava_record(record, index, images)


def _llava_record(record: object, index: int, images: Path) -> Sample | Skipped:
    if not isinstance(record, dict):
        return Skipped(f"record {index}", BAD_RECORD, "not a JSON object")
    sample_id = str(record.get("id", f"record {index}"))
    try:
        names = record.get("image") or []
        names = [names] if isinstance(names, str) else names
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise SkipRecord(BAD_RECORD, "'image' is not a path or a list of paths")
        conversations = normalise_conversation(record.get("conversations"), len(names))
    except SkipRecord as skip:
        return Skipped(sample_id, skip.reason, skip.detail)
    refs = [ImageRef(name, str(images / name), root=str(images)) for name in names]
    return Sample(sample_id, "llava", conversations, refs)


def index_base64_images(images_json: Path) -> dict[str, tuple[int, int]]:
    """Maps each image id of a MIMIC-IT image JSON to the byte range of its base64 string.

    One pass over the file; values that are not strings are left out (a sample naming
    them is skipped as missing_image).
    """
    index = {}
    with JsonScanner(images_json) as scanner:
        if scanner.peek() != "{":
            raise DataError(
                f"{images_json}: expected a JSON object mapping image ids to base64 images "
                "(MIMIC-IT's image JSON); pass it as --images"
            )
        for image_id in scanner.object_keys():
            is_string = scanner.peek() == '"'
            start, end, _ = scanner.value(parse=False)
            if is_string:
                index[image_id] = (start + 1, end - start - 2)  # inside the quotes
    return index


def read_mimicit(instructions: Path, images_json: Path) -> Iterator[Sample | Skipped]:
    """Yields one item per entry of a MIMIC-IT instruction JSON's "data" object, in order.

    The human turn is one `<image>\\n` per image followed by the instruction, the gpt turn the
    answer. `rel_ins_ids` (in-context examples) are not used. Unreadable files, or files that
    are not JSON objects, raise DataError here, before the first item; the image JSON is
    indexed here too (one pass over it), after the instruction file is checked.
    """
    scanner = JsonScanner(instructions)
    if scanner.peek() != "{":
        scanner.close()
        raise DataError(f"{instructions}: expected a MIMIC-IT instruction JSON object; check --format")
    try:
        index = index_base64_images(images_json)
    except DataError:
        scanner.close()
        raise
    return _mimicit_items(scanner, instructions, images_json, index)


def _mimicit_items(
    scanner: JsonScanner, instructions: Path, images_json: Path, index: dict[str, tuple[int, int]]
) -> Iterator[Sample | Skipped]:
    with scanner:
        found = False
        for key in scanner.object_keys():
            if key != "data" or scanner.peek() != "{":
                scanner.value(parse=False)
                continue
            found = True
            for sample_id in scanner.object_keys():
                try:
                    record = scanner.value()[2]
                except BadJson as e:
                    yield Skipped(sample_id, BAD_RECORD, str(e))
                    continue
                yield _mimicit_record(sample_id, record, images_json, index)
        if not found:
            raise DataError(f'{instructions}: no "data" object; expected MIMIC-IT\'s {{"data": {{id: ...}}}}')


def _mimicit_record(
    sample_id: str, record: object, images_json: Path, index: dict[str, tuple[int, int]]
) -> Sample | Skipped:
    try:
        if not isinstance(record, dict):
            raise SkipRecord(BAD_RECORD, "not a JSON object")
        instruction, answer = record.get("instruction"), record.get("answer")
        image_ids = record.get("image_ids") or []
        if not isinstance(instruction, str) or not isinstance(answer, str):
            raise SkipRecord(BAD_RECORD, "'instruction' or 'answer' is not a string")
        if not isinstance(image_ids, list) or not all(isinstance(i, str) for i in image_ids):
            raise SkipRecord(BAD_RECORD, "'image_ids' is not a list of strings")
        human = IMAGE_MARKER + "\n"
        turns = [{"from": "human", "value": human * len(image_ids) + instruction}, {"from": "gpt", "value": answer}]
        conversations = normalise_conversation(turns, len(image_ids))
        missing = [i for i in image_ids if i not in index]
        if missing:
            raise SkipRecord(MISSING_IMAGE, f"image id {missing[0]} not in {images_json.name}")
    except SkipRecord as skip:
        return Skipped(sample_id, skip.reason, skip.detail)
    refs = [ImageRef(i, str(images_json), *index[i]) for i in image_ids]
    return Sample(sample_id, "mimicit", conversations, refs)


class BadJson(ValueError):
    """One value is not valid JSON; the scanner has moved past it and can go on."""


_DECODER = json.JSONDecoder()
_DELIMITERS = (" ", "\t", "\r", "\n", ",", "]", "}", ":")
_NON_WS = re.compile(r"[^ \t\r\n]")
# A whole string (possessive: no backtracking), a bracket, or a quote whose string goes on
# past the buffer (then walked piece by piece).
_TOKEN = re.compile(r'"(?:[^"\\]++|\\.)*+"|[\[\]{}]|"', re.S)
_STRING_END = re.compile(r'[\\"]')
_SCALAR_END = re.compile(r"[,\]} \t\r\n]")


class JsonScanner:
    """Reads a JSON file one value at a time, with the byte range of each value.

    Only a window of the file is buffered (plus the value being read), so memory does not
    grow with the file. The file is decoded as Latin-1, one character per byte, so positions
    are byte offsets (MIMIC-IT images are read back by offset); JSON's syntax is ASCII, and a
    value holding other bytes is parsed again from its UTF-8 bytes.

    A value is parsed by the C decoder (`raw_decode`) straight from the buffer. Only when that
    fails, because the value runs past the buffer or is broken, is it walked token by token
    (strings and brackets, one regular expression) to find its end: then a broken value
    raises `BadJson` with the scanner past it, so a bad record is skipped, not a bad file.
    A file whose structure breaks (truncated, unbalanced) raises DataError.
    """

    def __init__(self, path: Path, chunk_size: int = 1 << 20):
        self._path, self._chunk_size = path, chunk_size
        try:
            # newline="": no newline translation, which would shift the offsets.
            self._f = open(path, encoding="latin-1", newline="")
        except OSError as e:
            raise DataError(f"{path}: cannot read it ({e.strerror}); check the path and its permissions") from None
        self._buf = ""
        self._base = 0  # file offset of _buf[0]
        self._pos = 0  # cursor, an index into _buf
        self._keep: int | None = None  # index into _buf from which text must stay buffered
        self._eof = False
        self._more()
        if self._buf.startswith("\xef\xbb\xbf"):  # a UTF-8 byte order mark
            self._pos = 3

    def __enter__(self) -> JsonScanner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    def _more(self) -> bool:
        """Appends the next chunk, dropping consumed text. False at end of file."""
        chunk = self._f.read(self._chunk_size)
        if not chunk:
            self._eof = True
            return False
        drop = self._pos if self._keep is None else min(self._pos, self._keep)
        self._buf = self._buf[drop:] + chunk
        self._base += drop
        self._pos -= drop
        if self._keep is not None:
            self._keep -= drop
        return True

    def _error(self, what: str) -> DataError:
        return DataError(
            f"{self._path}: invalid JSON at byte {self._base + self._pos}: {what}; "
            "the file is truncated or corrupt: download it again"
        )

    def _search(self, pattern: re.Pattern[str], what: str) -> re.Match[str]:
        """The next match of pattern from the cursor, reading more of the file as needed."""
        while (m := pattern.search(self._buf, self._pos)) is None:
            self._pos = len(self._buf)
            if not self._more():
                raise self._error(what)
        return m

    def peek(self) -> str:
        """The next non-whitespace character (whitespace is consumed), "" at end of file."""
        try:
            self._pos = self._search(_NON_WS, "").start()
        except DataError:
            return ""
        return self._buf[self._pos]

    def expect(self, char: str) -> None:
        found = self.peek()
        if found != char:
            raise self._error(f"expected {char!r}, found {found!r}")
        self._pos += 1

    def value(self, parse: bool = True) -> tuple[int, int, object]:
        """Consumes the next value; returns its byte range and (if parse) the value."""
        if not self.peek():
            raise self._error("unexpected end of file")
        start = self._base + self._pos
        if not parse:  # nothing to keep: a many-MB base64 string is never held whole
            self._walk()
            return start, self._base + self._pos, None
        self._keep = self._pos  # _more() moves it along with the buffer
        try:
            try:
                obj, end = _DECODER.raw_decode(self._buf, self._keep)
                # A number may go on past what is buffered ("12" of "12.5"): accept the
                # value only when a delimiter (or the end of the file) follows it.
                if self._buf[end : end + 1] in _DELIMITERS or self._eof:
                    text, self._pos = self._buf[self._keep : end], end
                    return start, self._base + end, _utf8(obj, text)
            except (json.JSONDecodeError, RecursionError):
                pass  # cut by the buffer's end, or broken: the walk tells
            self._walk()
            text = self._buf[self._keep : self._pos]
            try:
                return start, self._base + self._pos, _utf8(json.loads(text), text)
            except (ValueError, RecursionError) as e:
                raise BadJson(f"invalid JSON: {e}") from None
        finally:
            self._keep = None

    def _walk(self) -> None:
        """Moves the cursor past the value it is at, counting brackets, reading as needed."""
        first = self._buf[self._pos]
        self._pos += 1
        if first == '"':
            self._skip_string()
        elif first in "[{":
            depth = 1
            while depth:
                m = self._search(_TOKEN, "unclosed array or object")
                self._pos = m.end()
                if m[0] == '"':
                    self._skip_string()
                elif len(m[0]) == 1:
                    depth += 1 if m[0] in "[{" else -1
        else:
            try:
                self._pos = self._search(_SCALAR_END, "").start()
            except DataError:
                pass  # a scalar may end the file

    def _skip_string(self) -> None:
        """Moves the cursor past the closing quote of the string it is in."""
        while True:
            m = self._search(_STRING_END, "unterminated string")
            self._pos = m.end()
            if m[0] == '"':
                return
            # A backslash escapes the next character, which may still be unread.
            if self._pos == len(self._buf) and not self._more():
                raise self._error("unterminated string")
            self._pos += 1

    def array_items(self) -> Iterator[int]:
        """The index of each item of the array at the cursor; the caller consumes each item
        (with `value`) before asking for the next."""
        self.expect("[")
        if self.peek() == "]":
            self._pos += 1
            return
        index = 0
        while True:
            yield index
            index += 1
            if self.peek() != ",":
                self.expect("]")
                return
            self._pos += 1

    def object_keys(self) -> Iterator[str]:
        """Each key of the object at the cursor; the caller consumes its value (`value` or a
        nested walk) before asking for the next key."""
        self.expect("{")
        if self.peek() == "}":
            self._pos += 1
            return
        while True:
            if self.peek() != '"':
                raise self._error("expected a string key")
            try:
                key = self.value()[2]
            except BadJson:
                raise self._error("unreadable key") from None
            self.expect(":")
            yield key  # type: ignore[misc]
            if self.peek() != ",":
                self.expect("}")
                return
            self._pos += 1


def _utf8(obj: object, text: str) -> object:
    """The value as UTF-8 JSON means it: parsed from Latin-1 text, it is right only if ASCII."""
    if text.isascii():
        return obj
    try:
        return json.loads(text.encode("latin-1"))
    except UnicodeDecodeError as e:
        raise BadJson(f"not UTF-8: {e}") from None
