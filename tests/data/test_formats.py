"""Readers of the public formats: the streaming JSON scanner, LLaVA and MIMIC-IT records."""

import json

import pytest

from megamod.data.formats import (
    BAD_RECORD,
    EMPTY_CONVERSATION,
    IMAGE_MARKER_MISMATCH,
    BadJson,
    ImageRef,
    JsonScanner,
    Sample,
    SkipRecord,
    Skipped,
    index_base64_images,
    normalise_conversation,
    read_llava,
    read_mimicit,
)
from megamod.errors import DataError
from tests.data.fixtures import image_bytes, make_llava, make_mimicit

LIMIT = 1 << 30  # bytes an ImageRef may read

# Strings that trip naive scanners: escaped quotes and backslashes, brackets in text,
# non-ASCII (several bytes a character), a backslash right before a closing quote.
TRICKY = [
    {"id": "a", "value": 'say "hi" [not a bracket] {nor this}', "n": -1.5e3},
    {"id": "é/ü.x", "value": "naïve café 日本語 \\ back\\slash\\", "list": [[], {}, [1, [2]]]},
    "a plain string \\\"",
    12345,
    35161.03549,  # a number cut after its "." must not read as 35161
    -2.5e-7,
    None,
    {"id": "last", "value": "\n\t\u0001"},
]


@pytest.mark.parametrize("chunk_size", [*range(1, 12), 1 << 20])
def test_scanner_reads_every_value_across_chunk_boundaries(tmp_path, chunk_size):
    path = tmp_path / "a.json"
    path.write_text(json.dumps(TRICKY, indent=1, ensure_ascii=False), encoding="utf-8")
    with JsonScanner(path, chunk_size=chunk_size) as scanner:
        values = [scanner.value()[2] for _ in scanner.array_items()]
    assert values == TRICKY


@pytest.mark.parametrize("chunk_size", [2, 1 << 20])
def test_scanner_gives_byte_offsets_of_values(tmp_path, chunk_size):
    # Keys with multi-byte characters come first: offsets must count bytes, not characters.
    obj = {"日本": "QUJD", "naïve": "REVG\\/", "x": {"nested": ["[", "]"]}, "z": "R0hJ"}
    text = json.dumps(obj, ensure_ascii=False)
    path = tmp_path / "o.json"
    path.write_bytes(text.encode("utf-8"))
    data = path.read_bytes()
    with JsonScanner(path, chunk_size=chunk_size) as scanner:
        spans = {key: scanner.value(parse=False)[:2] for key in scanner.object_keys()}
    assert list(spans) == list(obj)
    for key, (start, end) in spans.items():
        assert json.loads(data[start:end]) == obj[key]


@pytest.mark.parametrize("chunk_size", [4, 1 << 20])
def test_a_broken_record_is_skipped_and_the_scan_goes_on(tmp_path, chunk_size):
    path = tmp_path / "b.json"
    path.write_text('[{"a": 1}, {"b" 2, "s": "}"}, {"c": [1, 2,]}, {"d": 4}]')
    out = []
    with JsonScanner(path, chunk_size=chunk_size) as scanner:
        for _ in scanner.array_items():
            try:
                out.append(scanner.value()[2])
            except BadJson:
                out.append("bad")
    assert out == [{"a": 1}, "bad", "bad", {"d": 4}]


@pytest.mark.parametrize("text", ['[{"a": 1}, {"b": "cut', '[{"a": 1}, {"b": 2}', '[{"a": 1} {"b": 2}]'])
def test_a_broken_file_raises_dataerror_naming_it(tmp_path, text):
    path = tmp_path / "llava.json"
    path.write_text(text)
    with pytest.raises(DataError, match=r"llava\.json: invalid JSON at byte \d+"):
        list(read_llava(path, tmp_path))


def test_unreadable_or_wrong_annotations_raise_dataerror(tmp_path):
    with pytest.raises(DataError, match="nope.json: cannot read it"):
        list(read_llava(tmp_path / "nope.json", tmp_path))
    with pytest.raises(DataError, match="cannot read it"):
        list(read_llava(tmp_path, tmp_path))  # a folder
    fixture = make_mimicit(tmp_path / "m")
    with pytest.raises(DataError, match="expected a JSON array.*--format"):
        read_llava(fixture.annotations, tmp_path)  # raises before the first item
    with pytest.raises(DataError, match="expected a MIMIC-IT"):
        read_mimicit(make_llava(tmp_path / "l").annotations, fixture.images)
    # An object without "data", and an image JSON that is an array.
    (tmp_path / "nodata.json").write_text('{"meta": {"data": 1}}')
    with pytest.raises(DataError, match='no "data" object'):
        list(read_mimicit(tmp_path / "nodata.json", fixture.images))
    (tmp_path / "arr.json").write_text("[]")
    with pytest.raises(DataError, match="expected a JSON object mapping image ids"):
        index_base64_images(tmp_path / "arr.json")


def test_read_llava_normalises_samples_and_names_skips(tmp_path):
    fixture = make_llava(tmp_path)
    items = list(read_llava(fixture.annotations, fixture.images))
    samples = [i for i in items if isinstance(i, Sample)]
    skipped = [i for i in items if isinstance(i, Skipped)]
    # Reader-level skips only: image problems are found when the images are decoded.
    assert [s.id for s in samples] == [e.id for e in fixture.expected[:3]] + ["truncated", "missing"] + [
        e.id for e in fixture.expected[3:]
    ]
    assert [(s.id, s.reason) for s in skipped] == [
        ("empty", EMPTY_CONVERSATION),
        ("no-marker", IMAGE_MARKER_MISMATCH),
        ("bad-role", BAD_RECORD),
        ("record 11", BAD_RECORD),  # the record with a missing comma: no id to name it by
    ]
    by_id = {s.id: s for s in samples}
    assert by_id["i6IyJda_0"].images == [] and len(by_id["i6IyJda_0"].conversations) == 4
    assert [t["from"] for t in by_id["42"].conversations] == ["human", "gpt"]  # from user/assistant
    assert [r.name for r in by_id["multi-1"].images] == ["coco/train2017/000000033471.jpg", "00453/004539375.jpg"]
    assert by_id["004539375"].images[0].read(LIMIT) == image_bytes("astronaut")
    assert all(s.source == "llava" for s in samples)


def test_read_mimicit_builds_one_marker_per_image(tmp_path):
    fixture = make_mimicit(tmp_path)
    index = index_base64_images(fixture.images)
    assert set(index) == {"SD_IMG_1", "SD_IMG_2", "SD_IMG_3", "LA_IMG_GRAY", "LA_IMG_TRUNC", "LA_IMG_LOGO"}
    items = {i.id: i for i in read_mimicit(fixture.annotations, fixture.images)}
    three = items["SD_INS_00000"]
    assert three.conversations == [
        {"from": "human", "value": "<image>\n<image>\n<image>\nHow do these three pictures differ?"},
        {"from": "gpt", "value": "A person, a cat and a cup of coffee."},
    ]
    assert [r.read(LIMIT) for r in three.images] == fixture.expected[0].image_bytes
    # URL-safe base64 without padding, and base64 with JSON-escaped slashes.
    assert items["LACR_I2I_INS_00001"].images[0].read(LIMIT) == image_bytes("camera")
    assert items["LA_INS_00008"].images[0].read(LIMIT) == image_bytes("logo", "PNG")
    assert items["TXT_INS_00002"].images == []
    assert [(i.id, i.reason) for i in items.values() if isinstance(i, Skipped)] == [
        ("LA_INS_00003", "missing_image"),
        ("LA_INS_00005", BAD_RECORD),
        ("LA_INS_00006", EMPTY_CONVERSATION),
        ("LA_INS_00007", IMAGE_MARKER_MISMATCH),
    ]


def test_image_ref_reads_a_file_or_a_base64_range(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"raw bytes")
    assert ImageRef("x.bin", str(tmp_path / "x.bin")).read(100) == b"raw bytes"
    (tmp_path / "x.json").write_text('{"k": "aGVsbG8"}')  # "hello", unpadded
    assert ImageRef("k", str(tmp_path / "x.json"), 7, 7).read(100) == b"hello"


@pytest.mark.parametrize(
    "turns, n_images, reason",
    [
        ([], 0, EMPTY_CONVERSATION),
        ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": " "}], 0, EMPTY_CONVERSATION),
        ([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "<image> too"}], 1, IMAGE_MARKER_MISMATCH),
        ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}], 1, IMAGE_MARKER_MISMATCH),
        ([{"from": "system", "value": "hi"}], 0, BAD_RECORD),
        ([{"from": "human", "value": 3}], 0, BAD_RECORD),
        ({"from": "human"}, 0, BAD_RECORD),
    ],
)
def test_normalise_conversation_rejects(turns, n_images, reason):
    with pytest.raises(SkipRecord) as info:
        normalise_conversation(turns, n_images)
    assert info.value.reason == reason
