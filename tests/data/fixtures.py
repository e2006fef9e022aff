"""Data fixtures in the real public formats, made from scikit-image's bundled photos.

`make_llava(root)` writes a LLaVA JSON array (558k / mix-665k schema) with its image folder,
`make_mimicit(root)` a MIMIC-IT instruction JSON with its base64 image JSON. Each mixes
good samples (grayscale JPEG, RGBA PNG, a PNG named .jpg as in LLaVA's ocr_vqa download,
multi-turn, text-only, several images, user/assistant roles, ids with dots and slashes) with
every kind of broken one, and returns a `Fixture` saying what a correct shard build holds.
`build_fixture_shards` runs the shard builder on one, for loader tests.
"""

from __future__ import annotations

import base64
import functools
import importlib.resources
import io
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from megamod.data.shards import build_shards


@dataclass
class Expected:
    """One sample a correct build writes, in order."""

    id: str
    images: list[str]  # member suffixes, e.g. ["img0.jpg"]
    image_bytes: list[bytes]  # the original encoded bytes the shard must hold
    modes: list[str]  # PIL modes of the decoded images ("RGB", "L", "RGBA")
    turns: int


@dataclass
class Fixture:
    format: str  # "llava" | "mimicit"
    annotations: Path
    images: Path
    expected: list[Expected]
    skipped: dict[str, int]  # reason -> count


_SKIMAGE_FILES = {"astronaut": "astronaut.png", "chelsea": "chelsea.png", "coffee": "coffee.png",
                  "camera": "camera.png", "logo": "logo.png", "rocket": "rocket.jpg"}


@functools.lru_cache(maxsize=None)
def image_bytes(name: str, fmt: str = "JPEG") -> bytes:
    """A photo scikit-image ships (astronaut, chelsea, coffee, camera: grayscale, logo: RGBA,
    rocket) in `fmt`: the shipped file as is when it has that format, else re-encoded."""
    path = importlib.resources.files("skimage.data") / _SKIMAGE_FILES[name]
    with Image.open(path) as image:
        if image.format == fmt:
            return path.read_bytes()
        buf = io.BytesIO()
        image.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def truncated_jpeg() -> bytes:
    """A JPEG cut off half way, as an interrupted download leaves it."""
    data = image_bytes("astronaut")
    return data[: len(data) // 2]


def _turns(*texts: str, roles: tuple[str, str] = ("human", "gpt")) -> list[dict[str, str]]:
    return [{"from": roles[i % 2], "value": text} for i, text in enumerate(texts)]


def make_llava(root: Path) -> Fixture:
    """LLaVA JSON at root/llava.json, images under root/images (coco/, vg/, ocr_vqa/ ...)."""
    images = root / "images"
    files = {
        "00453/004539375.jpg": image_bytes("astronaut"),
        "coco/train2017/000000033471.jpg": image_bytes("chelsea"),
        "vg/VG_100K/2354786.jpg": image_bytes("camera"),  # grayscale JPEG
        "textvqa/train_images/0a0bc91825468c45.png": image_bytes("logo", "PNG"),  # RGBA
        "ocr_vqa/images/140031996.jpg": image_bytes("coffee", "PNG"),  # a PNG named .jpg
        "gqa/images/n161313.jpg": image_bytes("rocket"),
        "coco/train2017/000000000009.jpg": truncated_jpeg(),
    }
    for rel, data in files.items():
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        (images / rel).write_bytes(data)

    good = [
        ({"id": "004539375", "image": "00453/004539375.jpg",
          "conversations": _turns("Render a clear and concise summary of the photo.\n<image>",
                                  "an astronaut in a white suit poses in front of a flag")},
         [("astronaut", "jpg", "RGB")]),
        ({"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
          "conversations": _turns("<image>\nWhat animal is this?", "A cat.",
                                  "What color is its fur?", "Orange and brown with darker stripes.",
                                  "Is it indoors?", "It seems so.")},
         [("chelsea", "jpg", "RGB")]),
        ({"id": "i6IyJda_0",  # text-only (ShareGPT in the 665k mix): no "image"
          "conversations": _turns("Write a haiku about shards.", "Tar files in a row / ...",
                                  "Another one?", "Bytes flow, never torn")},
         []),
        ({"id": "2354786", "image": "vg/VG_100K/2354786.jpg",
          "conversations": _turns("<image>\nWhat is the man holding?", "A camera on a tripod.")},
         [("camera", "jpg", "L")]),
        ({"id": "textvqa/0a0bc91825468c45.v2",  # dots and slashes: not usable as a tar key
          "image": "textvqa/train_images/0a0bc91825468c45.png",
          "conversations": _turns("<image>\nWhat does the logo say?", "scikit-image")},
         [("logo", "png", "RGBA")]),
        ({"id": "140031996", "image": "ocr_vqa/images/140031996.jpg",
          "conversations": _turns("<image>\nWhat is in the cup?", "Coffee.")},
         [("coffee", "png", "RGB")]),
        ({"id": 42, "image": "gqa/images/n161313.jpg",  # integer id, user/assistant roles
          "conversations": _turns("<image>\nWhat is this?", "A rocket on its launch pad.",
                                  roles=("user", "assistant"))},
         [("rocket", "jpg", "RGB")]),
        ({"id": "multi-1", "image": ["coco/train2017/000000033471.jpg", "00453/004539375.jpg"],
          "conversations": _turns("<image>\n<image>\nWhich picture shows a person?", "The second.")},
         [("chelsea", "jpg", "RGB"), ("astronaut", "jpg", "RGB")]),
    ]
    bad = [
        {"id": "truncated", "image": "coco/train2017/000000000009.jpg",
         "conversations": _turns("<image>\nDescribe.", "A person.")},
        {"id": "missing", "image": "coco/train2017/000000999999.jpg",
         "conversations": _turns("<image>\nDescribe.", "Nothing.")},
        {"id": "empty", "image": "gqa/images/n161313.jpg", "conversations": []},
        {"id": "no-marker", "image": "gqa/images/n161313.jpg",
         "conversations": _turns("Describe the picture.", "A rocket.")},
        {"id": "bad-role", "conversations": [{"from": "robot", "value": "beep"}]},
    ]
    # Good and bad interleaved; one record is not even valid JSON (a missing comma).
    texts = [json.dumps(record) for record, _ in good[:3]] + [json.dumps(bad[0]), json.dumps(bad[1])]
    texts += [json.dumps(record) for record, _ in good[3:6]] + [json.dumps(r) for r in bad[2:]]
    texts += ['{"id": "broken" "image": "gqa/images/n161313.jpg", "conversations": []}']
    texts += [json.dumps(record) for record, _ in good[6:]]
    annotations = root / "llava.json"
    annotations.write_text("[\n" + ",\n".join(texts) + "\n]\n")

    expected = [
        Expected(str(record["id"]), [f"img{i}.{ext}" for i, (_, ext, _) in enumerate(imgs)],
                 [image_bytes(n, "PNG" if ext == "png" else "JPEG") for n, ext, _ in imgs],
                 [mode for _, _, mode in imgs], len(record["conversations"]))
        for record, imgs in good
    ]
    skipped = {"bad_image": 1, "missing_image": 1, "empty_conversation": 1,
               "image_marker_mismatch": 1, "bad_record": 2}
    return Fixture("llava", annotations, images, expected, skipped)


def make_mimicit(root: Path) -> Fixture:
    """MIMIC-IT instruction JSON at root/SD_instructions.json, image JSON at root/SD.json."""
    root.mkdir(parents=True, exist_ok=True)
    b64 = {
        "SD_IMG_1": base64.b64encode(image_bytes("astronaut")).decode(),
        "SD_IMG_2": base64.b64encode(image_bytes("chelsea")).decode(),
        "SD_IMG_3": base64.b64encode(image_bytes("coffee", "PNG")).decode(),
        # Otter decodes with urlsafe_b64decode: accept that alphabet, and no padding.
        "LA_IMG_GRAY": base64.urlsafe_b64encode(image_bytes("camera")).decode().rstrip("="),
        "LA_IMG_TRUNC": base64.b64encode(truncated_jpeg()).decode(),
        "LA_IMG_LOGO": base64.b64encode(image_bytes("logo", "PNG")).decode(),
    }
    # JSON may escape "/" as "\/" (PHP, some JS encoders): the logo is written that way.
    items = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in b64.items() if k != "LA_IMG_LOGO"]
    items.append('"LA_IMG_LOGO": "' + b64["LA_IMG_LOGO"].replace("/", "\\/") + '"')
    images = root / "SD.json"
    images.write_text("{\n" + ",\n".join(items) + "\n}\n")

    def entry(instruction: object, answer: object, image_ids: list[str]) -> dict:
        return {"instruction": instruction, "answer": answer, "image_ids": image_ids, "rel_ins_ids": []}

    data = {
        "SD_INS_00000": entry("How do these three pictures differ?", "A person, a cat and a cup of coffee.",
                              ["SD_IMG_1", "SD_IMG_2", "SD_IMG_3"]),
        "LACR_I2I_INS_00001": entry("What is the man doing?", "Taking a photo.", ["LA_IMG_GRAY"]),
        "TXT_INS_00002": entry("Say hello.", "Hello!", []),
        "LA_INS_00003": entry("Describe it.", "Gone.", ["LA_IMG_NOT_THERE"]),
        "LA_INS_00004": entry("Describe it.", "Broken.", ["LA_IMG_TRUNC"]),
        "LA_INS_00005": entry("No answer here.", None, ["SD_IMG_1"]),
        "LA_INS_00006": entry("Empty answer.", "  ", ["SD_IMG_1"]),
        "LA_INS_00007": entry("Look at <image> this.", "Two markers.", ["SD_IMG_1"]),
        "LA_INS_00008": entry("What does the logo say?", "scikit-image", ["LA_IMG_LOGO"]),
    }
    annotations = root / "SD_instructions.json"
    annotations.write_text(json.dumps({"meta": {"version": "0.0.1", "time": "2023-06", "author": "ntu"},
                                       "data": data}, indent=2))
    expected = [
        Expected("SD_INS_00000", ["img0.jpg", "img1.jpg", "img2.png"],
                 [image_bytes("astronaut"), image_bytes("chelsea"), image_bytes("coffee", "PNG")],
                 ["RGB", "RGB", "RGB"], 2),
        Expected("LACR_I2I_INS_00001", ["img0.jpg"], [image_bytes("camera")], ["L"], 2),
        Expected("TXT_INS_00002", [], [], [], 2),
        Expected("LA_INS_00008", ["img0.png"], [image_bytes("logo", "PNG")], ["RGBA"], 2),
    ]
    skipped = {"missing_image": 1, "bad_image": 1, "bad_record": 1, "empty_conversation": 1,
               "image_marker_mismatch": 1}
    return Fixture("mimicit", annotations, images, expected, skipped)


def build_fixture_shards(fmt: str, root: Path, **options) -> tuple[Fixture, Path]:
    """Writes the fixture of `fmt` under root/src and its shards under root/shards."""
    fixture = (make_llava if fmt == "llava" else make_mimicit)(root / "src")
    out = root / "shards"
    options = {"workers": 0, "progress": False, **options}
    build_shards(fmt, fixture.annotations, fixture.images, out, **options)
    return fixture, out
