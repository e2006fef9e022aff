"""The bundled tiny data set: real photos from scikit-image with hand-written LLaVA samples.

Offline and small, for the CPU quickstart and the tests. `write_tiny_dataset(out_dir)`
writes `out_dir/images/*` and `out_dir/tiny_llava.json` in LLaVA's JSON format
(`[{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}]}]`); "image" paths are relative to `out_dir`.

Samples: one caption per image (stage-1 style, LLaVA-Pretrain), then instruction samples
(single and multi-turn), two multi-image ones ("image" is a list, with one `<image>` per
image in order) and two text-only ones (no "image" key).
The images are scikit-image's bundled files (public domain or CC0 photos, the
scikit-image logo), which load with no network.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

from megamod.data.conversation import TEMPLATE_TEXTS

JSON_NAME = "tiny_llava.json"
IMAGE_DIR = "images"

# skimage.data function -> (file written, caption). Grayscale camera/coins stay mode "L",
# the logo stays RGBA: the loader must cope with those modes. Large images are shrunk.
IMAGES: dict[str, tuple[str, str]] = {
    "astronaut": (
        "astronaut.jpg",
        "An astronaut in an orange launch suit smiles for her portrait, "
        "next to a flag, a model of the space shuttle and a black helmet.",
    ),
    "chelsea": ("chelsea.jpg", "A close-up of a tabby cat with green eyes looking at the camera."),
    "coffee": ("coffee.jpg", "A cup of espresso on a red saucer with a spoon, on a wooden table."),
    "rocket": ("rocket.jpg", "A white rocket stands on its launch pad at dusk, between tall towers and bright lights."),
    "camera": (
        "camera.jpg",
        "A black and white photo of a man in a dark coat filming with a camera on a tripod in a grassy field.",
    ),
    "hubble_deep_field": (
        "hubble_deep_field.jpg",
        "Many small galaxies of different colours shine against the black of deep space.",
    ),
    "retina": (
        "retina.jpg",
        "A photo of the back of a human eye: the orange retina, its red blood vessels and the bright optic disc.",
    ),
    "coins": ("coins.jpg", "A black and white photo of twenty-four old coins laid out in four rows on a dark cloth."),
    "logo": (
        "logo.png",
        "A round logo split by a white curve into a green half and an orange half, with a drawing of a snake.",
    ),
    "colorwheel": (
        "colorwheel.png",
        "A colour wheel on a black background: the colours change around the circle, from red at the top "
        "through green and cyan to blue, and fade to white at the centre.",
    ),
}

CAPTION_PROMPTS = (
    "<image>\nDescribe the image briefly.",
    "Give a short caption for this picture.\n<image>",
    "<image>\nWhat is in the photo?",
    "<image>\nWrite a one-sentence description of the image.",
)

# Instruction samples: (image names, rounds of (question, answer)). One "<image>\n" per
# image goes in front of the first question.
INSTRUCTIONS: list[tuple[tuple[str, ...], list[tuple[str, str]]]] = [
    (("astronaut",), [("What colour is the suit?", "The suit is orange.")]),
    (("astronaut",), [("Is the person smiling?", "Yes, she is smiling at the camera.")]),
    (
        ("astronaut",),
        [
            ("What is the model behind her?", "It is a model of the space shuttle."),
            ("Where is the flag?", "The flag is on the left side of the picture."),
        ],
    ),
    (("chelsea",), [("What animal is this?", "It is a cat.")]),
    (("chelsea",), [("What colour are the cat's eyes?", "The cat's eyes are green.")]),
    (
        ("chelsea",),
        [
            ("Is the cat looking at the camera?", "Yes, the cat looks straight at the camera."),
            ("What kind of fur does it have?", "It has striped tabby fur, brown and grey."),
        ],
    ),
    (("coffee",), [("What drink is in the cup?", "It is a cup of espresso.")]),
    (("coffee",), [("What colour is the saucer?", "The saucer is red.")]),
    (("coffee",), [("What is the table made of?", "The table is made of wood.")]),
    (("rocket",), [("What is standing on the launch pad?", "A white rocket is standing on the launch pad.")]),
    (("rocket",), [("Is it day or night?", "It is dusk: the sky is dark blue and the lights are on.")]),
    (
        ("rocket",),
        [
            ("How many tall towers can you see?", "I can see four tall towers around the rocket."),
            ("Is the rocket flying?", "No, the rocket is still standing on the ground."),
        ],
    ),
    (("camera",), [("Is this a colour photo?", "No, it is a black and white photo.")]),
    (("camera",), [("What is the man doing?", "He is filming with a camera on a tripod.")]),
    (("camera",), [("Where is he standing?", "He is standing in a grassy field, with buildings far behind him.")]),
    (("hubble_deep_field",), [("What are the small bright spots?", "They are galaxies, far away in deep space.")]),
    (("hubble_deep_field",), [("What colour is the background?", "The background is black.")]),
    (("retina",), [("What part of the body is this?", "It is the back of a human eye, the retina.")]),
    (
        ("retina",),
        [
            ("What are the red lines?", "The red lines are blood vessels."),
            ("What is the bright spot on the left?", "It is the optic disc, where the vessels enter the eye."),
        ],
    ),
    (("coins",), [("How many coins are there?", "There are twenty-four coins.")]),
    (("coins",), [("How are the coins arranged?", "They are laid out in four rows of six.")]),
    (("coins",), [("Are the coins new?", "No, they look very old.")]),
    (("logo",), [("What shape is the logo?", "The logo is round.")]),
    (("logo",), [("Which two colours does the logo use?", "It uses green and orange.")]),
    (("logo",), [("What animal is drawn on the logo?", "A snake is drawn on the logo.")]),
    (("colorwheel",), [("What colour is the centre of the wheel?", "The centre of the wheel is white.")]),
    (("colorwheel",), [("What colour is the background?", "The background is black.")]),
    (
        ("colorwheel",),
        [
            ("Which colour is at the top?", "Red is at the top of the wheel."),
            ("Which colour is at the bottom?", "Cyan is at the bottom, with green to its right."),
        ],
    ),
    (("astronaut", "rocket"), [("What do the two pictures have in common?", "Both are about space flight.")]),
    (("chelsea", "coffee"), [("Which picture shows an animal?", "The first picture shows an animal, a cat.")]),
    ((), [("What is a galaxy?", "A galaxy is a huge group of stars, gas and dust held together by gravity.")]),
    (
        (),
        [
            ("What colour do you get if you mix red and yellow?", "You get orange."),
            ("And blue and yellow?", "You get green."),
        ],
    ),
]


def _image_bytes(name: str, file_name: str) -> bytes:
    image = Image.fromarray(np.asarray(getattr(skimage.data, name)()))
    image.thumbnail((512, 512), Image.Resampling.LANCZOS)  # keep the files small
    buf = io.BytesIO()
    if file_name.endswith(".png"):
        image.save(buf, format="PNG")
    else:
        image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def tiny_samples() -> list[dict]:
    """The data set's samples in LLaVA JSON format (as written to tiny_llava.json)."""
    samples = []
    for i, (name, (file_name, caption)) in enumerate(IMAGES.items()):
        samples.append(
            {
                "id": f"tiny-caption-{name}",
                "image": f"{IMAGE_DIR}/{file_name}",
                "conversations": [
                    {"from": "human", "value": CAPTION_PROMPTS[i % len(CAPTION_PROMPTS)]},
                    {"from": "gpt", "value": caption},
                ],
            }
        )
    for i, (names, rounds) in enumerate(INSTRUCTIONS):
        sample: dict = {"id": f"tiny-instruct-{i:02d}"}
        if len(names) == 1:
            sample["image"] = f"{IMAGE_DIR}/{IMAGES[names[0]][0]}"
        elif names:
            sample["image"] = [f"{IMAGE_DIR}/{IMAGES[n][0]}" for n in names]
        turns = []
        for k, (question, answer) in enumerate(rounds):
            prefix = "<image>\n" * len(names) if k == 0 else ""
            turns += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
        sample["conversations"] = turns
        samples.append(sample)
    return samples


def tokenizer_corpus() -> list[str]:
    """The texts the tiny tokenizer is trained on: every turn's text and the templates' words.

    Answers also appear with the space that `vicuna_v1` puts before them, since a
    byte-level BPE tokenizes " It" and "It" differently.
    """
    texts = list(TEMPLATE_TEXTS)
    for sample in tiny_samples():
        for turn in sample["conversations"]:
            texts.append(turn["value"].replace("<image>\n", ""))
            if turn["from"] == "gpt":
                texts.append(" " + turn["value"])
    return texts


def _write_if_changed(path: Path, data: bytes) -> None:
    # Another process may be reading or writing the same file: never leave it partial,
    # and leave it alone if it already holds these bytes.
    if path.is_file() and path.read_bytes() == data:
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_tiny_dataset(out_dir: str | Path) -> Path:
    """Write the tiny data set's images and LLaVA JSON under `out_dir`; return the JSON's path.

    Idempotent and safe with concurrent callers: files are replaced atomically, and only
    when their content differs. The JSON is written last.
    """
    out_dir = Path(out_dir)
    (out_dir / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    for name, (file_name, _) in IMAGES.items():
        _write_if_changed(out_dir / IMAGE_DIR / file_name, _image_bytes(name, file_name))
    json_path = out_dir / JSON_NAME
    _write_if_changed(json_path, (json.dumps(tiny_samples(), indent=1) + "\n").encode())
    return json_path


if __name__ == "__main__":
    # Regenerates the bundled tokenizer asset from the tiny texts and the templates' words.
    from megamod.data.tokenizer import TINY_TOKENIZER_PATH, train_tiny_tokenizer

    train_tiny_tokenizer(tokenizer_corpus()).save(str(TINY_TOKENIZER_PATH), pretty=True)
    print(f"wrote {TINY_TOKENIZER_PATH}")
