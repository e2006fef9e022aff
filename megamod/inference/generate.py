"""Generation: a prompt and its images in, new tokens out, with a KV cache that p-MoD's
layers prune (`megamod.inference.cache`).

`Generator.generate` prefills a batch of prompts (left-padded; p-MoD's official code
handles batch 1 only), then decodes token by token: every MoD layer caches the keys and
values of the tokens it kept at prefill, new tokens run every layer (they are text).
`use_cache=False` is the reference: each step recomputes the whole sequence with the
training forward, one sample at a time.

`open_generator(CKPT_DIR)` rebuilds the model and tokenizer from what a checkpoint
directory carries (its config) in a one-process world (TP=1); `megamod generate`
(`megamod.cli.generate`) is its command line.

Lengths: a prompt and its new tokens must fit `model.language.seq_length`, the positions
the model was trained on (RoPE past them is extrapolation, and the KV cache is sized by the
request: 10^9 new tokens would ask for tens of GB). `prompt_tokens` refuses a prompt that
leaves no room, `new_tokens_budget` a request that does not fit. Image files are checked
against the config's `data.max_image_bytes` and `data.max_image_pixels` (from the header)
before they are decoded.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from megamod.config import Config, MoDConfig
from megamod.data.decode import ImageLimits, ImageTooLarge
from megamod.data.tokenizer import IMAGE_TOKEN, Tokenizer
from megamod.errors import DataError, MegamodError
from megamod.inference.cache import KVCache
from megamod.models.llava import LLaVA
from megamod.training.flops import Sample, kv_cache_bytes
from megamod.precision import DTYPES

DEFAULT_NEW_TOKENS = 64  # when not asked for a number: at most this many, as room allows


@dataclass
class Generation:
    tokens: list[list[int]]  # per sample, the new tokens (up to and without its EOS)
    cache_bytes: int  # keys and values cached (0 without the cache)
    dense_cache_bytes: int  # what every layer caching every token would take
    prompt_tokens: int  # prompt slots per sample (after left padding)


class Generator:
    """Generation from a LLaVA model in a one-process world (TP=1, no sequence parallelism)."""

    def __init__(self, model: LLaVA, tokenizer: Tokenizer, config: Config) -> None:
        # In the dtype training ran in: bf16/fp16 training wraps the model in megatron-core's
        # Float16Module, which casts all of it (routers compute in fp32 on their own).
        self.model = model.to(DTYPES[config.precision.params_dtype]).eval()
        self.tokenizer = tokenizer
        self.config = config  # the model's: image size, conversation template
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        images: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        use_cache: bool = True,
        seed: int = 0,
        stop_at_eos: bool = True,
    ) -> Generation:
        """`prompts`: token ids per sample, each `<image>` run of placeholders already
        expanded; `images`: [n, 3, H, W], the samples' images in order. Greedy at
        temperature 0, else sampled from softmax(logits / temperature). Without
        `stop_at_eos` every sample runs `max_new_tokens` steps (benchmarks)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        sampler = torch.Generator(device=self.device).manual_seed(seed)
        images = images.to(self.device, DTYPES[self.config.precision.params_dtype])
        if not use_cache:
            return self._generate_uncached(prompts, images, max_new_tokens, temperature, sampler)
        if self._needs_padding(prompts) and self._attention_ignores_masks():
            raise MegamodError(
                "a batch of prompts of different lengths or image counts needs padding masks, "
                "which transformer-engine's attention ignores (megatron-core asks it for "
                "'causal' or 'no_mask'): generate one prompt at a time, or batch equal ones"
            )
        tokens, padding = self._left_pad(prompts)
        s, b = tokens.shape[1], tokens.shape[0]
        positions = (torch.arange(s, device=self.device) - padding.sum(1, keepdim=True)).clamp(min=0)
        language = self.model.language_model
        cache = KVCache(positions.t(), ~padding.t(), max_new_tokens,
                        language.rotary_pos_emb(s + max_new_tokens))

        logits = self._forward(self.model.embed(tokens, images), tokens, cache)
        new = torch.empty(b, 0, dtype=torch.long, device=self.device)
        finished = torch.zeros(b, dtype=torch.bool, device=self.device)
        for step in range(max_new_tokens):
            next_token = self._sample(logits, temperature, sampler)
            new = torch.cat([new, next_token.unsqueeze(1)], dim=1)
            finished |= next_token == self.tokenizer.eos_id
            if step == max_new_tokens - 1 or (stop_at_eos and bool(finished.all())):
                break
            step_tokens = next_token.unsqueeze(1)  # [b, 1]
            embedded = language.embedding(input_ids=step_tokens, position_ids=None)
            logits = self._forward(embedded, step_tokens, cache)
        return Generation(
            [self._until_eos(row) if stop_at_eos else row for row in new.tolist()],
            cache.nbytes(),
            self._dense_cache_bytes(cache.max_sequence_length) * b,
            s,
        )

    def _needs_padding(self, prompts: Sequence[Sequence[int]]) -> bool:
        """Whether the batch pads: prompts of different lengths (left padding) or vision
        token counts (MoD layers keeping different numbers of tokens)."""
        image = self.model.image_token_id
        return len({(len(p), sum(t == image for t in p)) for p in prompts}) > 1

    def _attention_ignores_masks(self) -> bool:
        """transformer-engine's core attention: it applies its mask type, not our masks
        (without padding the cache passes none, and causal / no mask is exactly right)."""
        return any(type(m).__name__ == "TEDotProductAttention" for m in self.model.modules())

    def _left_pad(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """[b, s] token ids with every prompt ending at the last slot, and the padding."""
        length = max(len(p) for p in prompts)
        tokens = torch.full((len(prompts), length), self.tokenizer.pad_id, dtype=torch.long)
        padding = torch.ones(len(prompts), length, dtype=torch.bool)
        for i, prompt in enumerate(prompts):
            if len(prompt):
                tokens[i, -len(prompt):] = torch.as_tensor(prompt)
                padding[i, -len(prompt):] = False
        return tokens.to(self.device), padding.to(self.device)

    def _forward(self, embedded: torch.Tensor, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The decoder on `embedded` [n, b, h] (new tokens `tokens` [b, n]) against the
        cache; logits [b, v] of the last position."""
        self.model.describe_micro_batch(tokens, None)
        language = self.model.language_model
        with cache.in_layout(cache.dense, embedded.shape[0]) as (mask, rotary):
            hidden = language.decoder(
                hidden_states=embedded, attention_mask=mask, inference_context=cache,
                rotary_pos_emb=rotary,
            )
        weight = None
        if language.share_embeddings_and_output_weights:
            weight = language.shared_embedding_or_output_weight()
        logits, _ = language.output_layer(hidden[-1:], weight=weight)
        return logits[0].float()

    def _sample(self, logits: torch.Tensor, temperature: float, sampler: torch.Generator) -> torch.Tensor:
        """[b, v] -> [b]; ids past the tokenizer's (the embedding's padding rows) never win."""
        logits[:, self.tokenizer.vocab_size:] = float("-inf")
        if temperature == 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits / temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=sampler).squeeze(1)

    def _until_eos(self, ids: list[int]) -> list[int]:
        return ids[: ids.index(self.tokenizer.eos_id)] if self.tokenizer.eos_id in ids else ids

    def _dense_cache_bytes(self, tokens: int) -> int:
        """One sample's cache of `tokens` slots in every layer (the model with MoD off)."""
        dense = dataclasses.replace(self.config, mod=MoDConfig())
        element = torch.finfo(DTYPES[self.config.precision.params_dtype]).bits // 8
        return kv_cache_bytes(dense, Sample(images=0, seq_length=tokens), element)

    def images_per_prompt(self, prompts: Sequence[Sequence[int]], images: torch.Tensor) -> list[torch.Tensor]:
        """`images` (all prompts', in order) split by prompt, by their placeholder runs."""
        image_token, patches = self.model.image_token_id, self.model.num_patches
        counts = [sum(t == image_token for t in prompt) // patches for prompt in prompts]
        return list(images.split(counts))

    def _generate_uncached(
        self,
        prompts: Sequence[Sequence[int]],
        images: torch.Tensor,
        max_new_tokens: int,
        temperature: float,
        sampler: torch.Generator,
    ) -> Generation:
        """The reference: per sample, the training forward on the whole sequence per token."""
        results = []
        for prompt, own in zip(prompts, self.images_per_prompt(prompts, images)):
            sequence = torch.as_tensor(list(prompt), dtype=torch.long, device=self.device)
            new: list[int] = []
            for _ in range(max_new_tokens):
                logits = self.model(sequence.unsqueeze(0), own)[:, -1].float()
                next_token = self._sample(logits, temperature, sampler)
                new.append(int(next_token))
                if new[-1] == self.tokenizer.eos_id:
                    break
                sequence = torch.cat([sequence, next_token])
            results.append(self._until_eos(new))
        return Generation(results, 0, 0, max(len(p) for p in prompts))


# ------------------------------------------------------------------------------ loading


@contextlib.contextmanager
def open_generator(checkpoint_dir: str | Path) -> Iterator[Generator]:
    """The model and tokenizer of the latest checkpoint in `checkpoint_dir` (a training
    run's `checkpoint.save_dir`), built from the config saved with it, in a world of one."""
    from megamod.data.tokenizer import load_tokenizer
    from megamod.models.build import build_model, one_process_config
    from megamod.parallel import world_of_one
    from megamod.training import checkpoint

    saved = checkpoint.saved_config(checkpoint_dir)
    tokenizer = load_tokenizer(checkpoint.tokenizer_of(checkpoint_dir, saved))
    config = one_process_config(saved, tokenizer.vocab_size)  # a checkpoint loads at any TP/EP
    with world_of_one(config.parallel, config.train.seed, "generate"):
        model = build_model(config, tokenizer)
        checkpoint.load_model_weights(checkpoint_dir, model)
        yield Generator(model, tokenizer, config)


def prompt_tokens(
    generator: Generator, prompt: str, image_files: Sequence[str | Path]
) -> tuple[list[int], torch.Tensor]:
    """A user's prompt as the model was trained to read it: in the config's conversation
    template, one `<image>` per image (put first, as LLaVA does, where the text has
    none), and the images preprocessed as in training. Raises DataError for an image
    that is unreadable or over the config's image limits, or a prompt that leaves no
    room for an answer within `model.language.seq_length`."""
    import numpy as np
    from PIL import UnidentifiedImageError

    from megamod.data.conversation import encode_prompt
    from megamod.data.preprocess import preprocess_image
    config = generator.config
    markers = prompt.count(IMAGE_TOKEN)
    if markers == 0:
        prompt = IMAGE_TOKEN * len(image_files) + "\n" + prompt if image_files else prompt
    elif markers != len(image_files):
        raise DataError(
            f"--prompt holds {markers} {IMAGE_TOKEN} markers but {len(image_files)} --image "
            f"files were given: give one --image per marker (or no marker)"
        )
    limits = ImageLimits(config.data.max_image_pixels, config.data.max_image_bytes)
    pixels = []
    for path in image_files:
        try:
            limits.check_bytes(Path(path).stat().st_size)
            with limits.open(path) as image:
                pixels.append(preprocess_image(
                    image, config.model.vision.image_size, config.data.image_aspect_ratio
                ))
        except ImageTooLarge as e:
            raise DataError(
                f"--image {path}: {e} in the checkpoint's config: give a smaller image (downscale it)"
            ) from None
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(f"--image {path}: not a readable image ({e}): give a JPEG or PNG file") from None
    size = config.model.vision.image_size
    images = torch.from_numpy(np.stack(pixels)) if pixels else torch.empty(0, 3, size, size)
    ids = encode_prompt([{"from": "human", "value": prompt}], config.data.conversation_template,
                        generator.tokenizer, config.model.vision.num_patches)
    seq_length = config.model.language.seq_length
    if len(ids) >= seq_length:
        raise DataError(
            f"--prompt is {len(ids)} tokens (its images' {config.model.vision.num_patches} each and the "
            f"conversation template's included), which leaves no room for an answer within the model's "
            f"model.language.seq_length={seq_length}, the longest sequence it was trained on: shorten "
            f"the prompt (or give fewer images)"
        )
    return ids, images


def new_tokens_budget(generator: Generator, prompt_length: int, requested: int | None) -> int:
    """How many tokens to generate after a prompt of `prompt_length` tokens: `requested`, or
    when None up to DEFAULT_NEW_TOKENS as room allows. Raises DataError naming
    --max-new-tokens where the prompt and `requested` new tokens do not fit
    `model.language.seq_length` (see the module docstring)."""
    seq_length = generator.config.model.language.seq_length
    room = seq_length - prompt_length
    if requested is None:
        return min(DEFAULT_NEW_TOKENS, room)
    if requested > room:
        raise DataError(
            f"--max-new-tokens={requested} does not fit: the prompt's {prompt_length} tokens plus the new "
            f"ones must fit the model's model.language.seq_length={seq_length} (the longest sequence it "
            f"was trained on, which also bounds the KV cache): give --max-new-tokens {room} or less"
        )
    return requested
