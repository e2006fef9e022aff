"""Runs the official LLaVA code (llava-torch==1.2.2.post1 under its pinned transformers
4.36.2) on conversations given as JSON on stdin; prints input ids and labels as JSON.

Not a test module and never imported by one: `test_official_llava.py` runs it as
`python llava_reference.py` in a subprocess whose PYTHONPATH puts the official package and
its pinned transformers/tokenizers/sentencepiece first (megamod's own transformers is a
later major version, whose `use_fast=False` no longer gives LLaVA's slow tokenizer).

Everything that decides tokens and labels is the official code, run unmodified:
tokenizer loading as `llava/train/train.py::train` does (`AutoTokenizer.from_pretrained(...,
model_max_length, padding_side="right", use_fast=False)`, then `pad_token = unk_token`),
the dataset step of `LazySupervisedDataset.__getitem__` (`preprocess_multimodal` when the
sample has an image, then `preprocess`, which dispatches to `preprocess_plain` /
`preprocess_v1` by `conversation_lib.default_conversation`), `DataCollatorForSupervisedDataset`
(padding, truncation at `model_max_length`), and `LlavaMetaForCausalLM.
prepare_inputs_labels_for_multimodal` (each IMAGE_TOKEN_INDEX replaced by the image's
features, truncation at `tokenizer_model_max_length`). Only the vision tower is a stand-in:
`encode_images` returns `num_image_tokens` features per image whose value is
IMAGE_TOKEN_INDEX, and the embedding maps id i to the value i, so the model's input
embeddings read back as token ids.

The evaluation prompt is built as `llava/eval/model_vqa_loader.py` (CustomDataset.
__getitem__, lines 39-50) builds it: `<image>\\n` + question, `conv_templates[conv_mode]`,
assistant message None, `get_prompt()`, `tokenizer_image_token`.
"""

import contextlib
import copy
import io
import json
import sys
from types import SimpleNamespace

import torch
import transformers
import transformers.utils.import_utils

# The venv holds packages (lmms-eval's datasets, peft, accelerate, ...) newer than the
# official code's pinned transformers and huggingface_hub can import, and transformers'
# Trainer, which llava.train imports, imports whichever it finds. The preprocessing compared
# here needs none of them: transformers sees only what tokenizing needs.
_NEEDED = {"_torch_available", "_tokenizers_available", "_sentencepiece_available",
           "_protobuf_available", "_safetensors_available"}
for _name, _value in vars(transformers.utils.import_utils).copy().items():
    if _name.endswith("_available") and isinstance(_value, bool) and _name not in _NEEDED:
        setattr(transformers.utils.import_utils, _name, False)

from llava import conversation as conversation_lib  # noqa: E402
from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava.mm_utils import tokenizer_image_token
from llava.model.llava_arch import LlavaMetaForCausalLM
from llava.train import train as llava_train


class _Probe(LlavaMetaForCausalLM):
    """LlavaMetaForCausalLM with an identity embedding and a marker vision tower."""

    def __init__(self, vocab_size: int, num_image_tokens: int, max_length: int):
        embed = torch.nn.Embedding(vocab_size, 1)
        embed.weight.data = torch.arange(vocab_size, dtype=torch.float64)[:, None]
        self._model = SimpleNamespace(embed_tokens=embed, get_vision_tower=lambda: "vision tower")
        self.num_image_tokens = num_image_tokens
        self.config = SimpleNamespace(
            tokenizer_model_max_length=max_length, tokenizer_padding_side="right", mm_patch_merge_type="flat"
        )
        self.device = torch.device("cpu")

    def get_model(self):
        return self._model

    def encode_images(self, images):
        return torch.full((images.shape[0], self.num_image_tokens, 1), float(IMAGE_TOKEN_INDEX), dtype=torch.float64)


def load_tokenizer(folder: str, max_length: int):
    # llava/train/train.py::train, the non-mpt branch, then the `else` of the version switch.
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        folder, model_max_length=max_length, padding_side="right", use_fast=False
    )
    tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def train_sample(tokenizer, probe, conversations: list, has_image: bool, template: str) -> dict:
    conversation_lib.default_conversation = conversation_lib.conv_templates[template]
    data_args = SimpleNamespace(is_multimodal=True, mm_use_im_start_end=False)
    sources = [conversations]
    # LazySupervisedDataset.__getitem__
    if has_image:
        sources = llava_train.preprocess_multimodal(copy.deepcopy(sources), data_args)
    else:
        sources = copy.deepcopy(sources)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        data_dict = llava_train.preprocess(sources, tokenizer, has_image=has_image)
    instance = dict(input_ids=data_dict["input_ids"][0], labels=data_dict["labels"][0])
    instance["image"] = torch.zeros(3, 2, 2)  # an image, or the zeros LLaVA gives a text-only sample
    batch = llava_train.DataCollatorForSupervisedDataset(tokenizer=tokenizer)([instance])
    _, _, mask, _, embeds, labels = probe.prepare_inputs_labels_for_multimodal(
        batch["input_ids"], None, batch["attention_mask"], None, batch["labels"], batch["images"]
    )
    n = int(mask[0].sum())
    return {
        "input_ids": embeds[0, :n, 0].round().long().tolist(),
        "labels": labels[0, :n].tolist(),
        "unexpanded_input_ids": instance["input_ids"].tolist(),
        "mismatch": "tokenization mismatch" in printed.getvalue(),
    }


def eval_prompt(tokenizer, question: str, conv_mode: str) -> list:
    # llava/eval/model_vqa_loader.py, CustomDataset.__getitem__ (mm_use_im_start_end False)
    qs = DEFAULT_IMAGE_TOKEN + "\n" + question
    conv = conversation_lib.conv_templates[conv_mode].copy()
    conv.append_message(conv.roles[0], qs)
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()
    return tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX)


def run(request: dict) -> dict:
    tokenizer = load_tokenizer(request["tokenizer"], request["model_max_length"])
    probe = _Probe(len(tokenizer), request["num_image_tokens"], request["model_max_length"])
    out = []
    for case in request["cases"]:
        if case["kind"] == "train":
            out.append(train_sample(tokenizer, probe, case["conversations"], case["has_image"], case["template"]))
        else:
            out.append({"input_ids": eval_prompt(tokenizer, case["question"], case["template"])})
    # Plain tokenization (no BOS) of texts, as `tokenizer_image_token` tokenizes a chunk.
    texts = [tokenizer(t).input_ids[1:] for t in request.get("texts", [])]
    return {"cases": out, "texts": texts, "legacy": tokenizer.legacy}


def main() -> None:
    """stdin: {"runs": [{"tokenizer", "model_max_length", "num_image_tokens", "cases", "texts"}]}."""
    request = json.load(sys.stdin)
    runs = [run(r) for r in request["runs"]]
    json.dump({"runs": runs, "transformers": transformers.__version__}, sys.stdout)


if __name__ == "__main__":
    main()
