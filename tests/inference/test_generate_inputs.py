"""`megamod generate`'s inputs (issue 20, items 10, 15, 19): what it cannot use exits 2
with a message naming the argument and the limit, before anything large is allocated.

- Before the model loads: --temperature nan / inf / negative, an --image that is a folder
  or not a regular file (through `python -m megamod`'s entry point, in this process).
- With the tiny model (seq_length 128): a prompt that leaves no room for an answer, a
  --max-new-tokens the prompt plus the answer cannot fit (the largest that fits runs), a
  pixel bomb (13000 x 13000, and 20000 x 20000, past Pillow's own limit).
The command line's --max-new-tokens 1000000000 on a real checkpoint: tests/inference/test_generate.py.
"""

from __future__ import annotations

import os

import pytest

from megamod.__main__ import main as megamod_main
from megamod.errors import DataError
from tests.data.test_input_limits import huge_png
from tests.inference.test_generate import generator_for, world  # noqa: F401  (a fixture)


@pytest.fixture(scope="module")
def generator(world):  # noqa: F811
    return generator_for([])


def test_argument_errors_exit_2_before_the_model_loads(tmp_path, capsys):
    os.mkfifo(tmp_path / "pipe.png")
    # "nowhere" is no checkpoint: reaching it would say so instead.
    base = ["generate", "--checkpoint", str(tmp_path / "nowhere"), "--prompt", "x"]
    cases = [
        (["--temperature", "nan"], "--temperature=nan must be a number >= 0"),
        (["--temperature", "inf"], "--temperature=inf must be a number >= 0"),
        (["--temperature", "-0.5"], "--temperature=-0.5 must be a number >= 0"),
        (["--image", str(tmp_path)], f"--image {tmp_path} is a folder: give an image file"),
        (["--image", str(tmp_path / "pipe.png")], "pipe.png is not a regular file: give an image file"),
        (["--image", str(tmp_path / "missing.png")], "missing.png does not exist"),
    ]
    for args, message in cases:
        assert megamod_main(base + args) == 2, args
        err = capsys.readouterr().err
        assert message in err and "nowhere" not in err, (args, err)


def test_prompts_and_new_tokens_must_fit_the_sequence_length(generator):
    from megamod.inference.generate import DEFAULT_NEW_TOKENS, new_tokens_budget, prompt_tokens

    seq_length = generator.config.model.language.seq_length
    assert seq_length == 128

    with pytest.raises(DataError, match=r"--prompt is \d+ tokens .*model\.language\.seq_length=128"):
        prompt_tokens(generator, "tell me more " * 100, [])

    ids, images = prompt_tokens(generator, "What is it?", [])
    room = seq_length - len(ids)
    assert 0 < room < DEFAULT_NEW_TOKENS + len(ids)
    with pytest.raises(DataError, match=rf"--max-new-tokens=1000000000 .*give --max-new-tokens {room} or less"):
        new_tokens_budget(generator, len(ids), 10**9)
    with pytest.raises(DataError, match=rf"give --max-new-tokens {room} or less"):
        new_tokens_budget(generator, len(ids), room + 1)
    assert new_tokens_budget(generator, len(ids), None) == min(DEFAULT_NEW_TOKENS, room)
    # The largest that fits runs to the end of the sequence length.
    result = generator.generate([ids], images, new_tokens_budget(generator, len(ids), room), stop_at_eos=False)
    assert len(result.tokens[0]) == room


@pytest.mark.parametrize("side", [13000, 20000])  # 20000^2 is past Pillow's own bomb limit
def test_a_pixel_bomb_is_refused_naming_the_file_and_the_limit(generator, tmp_path, side):
    from megamod.inference.generate import prompt_tokens

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(huge_png(side, side))
    with pytest.raises(DataError) as refused:
        prompt_tokens(generator, "What is it?", [bomb])
    message = str(refused.value)
    # In megamod's words whether or not Pillow refused it first (past ~179 M pixels).
    assert message.startswith(f"--image {bomb}: ") and "decompression bomb" not in message
    assert f"{side * side:,} pixels, over the limit of 40,000,000 (data.max_image_pixels)" in message
    assert "smaller image" in message
