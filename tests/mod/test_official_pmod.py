"""megamod's p-MoD against the official code (MCG-NJU/p-MoD @ 459f6df6), transliterated in
`tests/mod/pmod_reference.py` (file and line of every official statement cited there).

Equal to the official code, on the same inputs:
- PRD: which of LLaVA-1.5's 32 layers are MoD layers and each one's ratio
  (`shiftedcos_decay_0.85_0.15`, `mod_router_factor` 0.5), exactly; `interleave`, `deep_all`.
- The kept vision count per sample, trunc(n x ratio) in float32, for every n up to two
  LLaVA-1.5 images and LLaVA-NeXT's counts (including the n where float32 and exact
  arithmetic disagree).
- TanhNorm (`tanh_0.2_1`, and sigmoid / none) and the router (Linear(h, 1) + bias, zero
  init, reading the layer input before its norm).
- Token selection: which positions each sample keeps (text always, top-k vision by weight,
  original order), with and without padding.
- The MoD layer's output (STRing: kept vision h + w f, text h + f, skipped vision w x, with
  h = x + Attn(LN(x)), f = MLP(LN(h)) on the kept tokens at their original positions):
  megamod's `MoDTransformerLayer` on the tiny model against the official `ModLayer.forward`
  around the same layer's weights; a micro-batch without images; and at inference
  (batch 1) the prefill output, the positions each MoD layer caches, and decoding against
  that cache.

Documented departures, asserted as megamod does them: ties broken by position, padding
kept in training, PRD's curve spread over the model's own depth. One undocumented edge
(vision weights saturating to the masked tokens' value) is asserted too.
"""

from __future__ import annotations

import pytest
import torch

from megamod.config import MoDConfig, load_config
from megamod.data.tokenizer import load_tokenizer
from megamod.mod.layer import select_kept_tokens
from megamod.mod.router import TokenRouter, WeightNorm
from megamod.mod.schedule import layer_ratios
from tests.launcher import TINY_CONFIG, world_of_one
from tests.mod import pmod_reference as official

QUIET = ["checkpoint.save_dir=null", "checkpoint.save_interval=null", "logging.tensorboard_dir=null"]
NORM = official.parse_weight_norm(official.RECIPE["mod_weight_norm"])  # ("tanh", 0.2, 1.0)
LLAVA15_LAYERS = 32


def official_ratios(num_layers: int = LLAVA15_LAYERS, **recipe) -> list:
    spec = dict(official.RECIPE, **recipe)
    chosen = official.build_mod_layers(spec["mod_target_layers"], num_layers, spec["mod_router_factor"])
    return [chosen.get(i) for i in range(num_layers)]


# ------------------------------------------------------------------------------ schedule


def test_prd_layers_and_ratios_equal_the_official_for_llava15():
    ours = layer_ratios(MoDConfig(enabled=True), LLAVA15_LAYERS)
    theirs = official_ratios()
    assert ours == theirs  # exact floats: the same expression, L - 1 = 31
    assert [i for i, r in enumerate(ours) if r is not None] == list(range(8, 32))
    assert ours[8] == pytest.approx(0.8445, abs=1e-4) and ours[31] == 0.15


@pytest.mark.parametrize("layers", ["interleave", "deep_all"])
@pytest.mark.parametrize("num_layers", [4, LLAVA15_LAYERS])
def test_fixed_schedules_equal_the_official(layers, num_layers):
    ours = layer_ratios(MoDConfig(enabled=True, schedule="fixed", layers=layers, ratio=0.5), num_layers)
    assert ours == official_ratios(num_layers, mod_target_layers=layers, mod_router_factor=0.5)


def test_deep_all_include_last_is_a_layer_list():
    """The official `deep_all_include_last` has no name here: a list of layers says it."""
    ours = layer_ratios(MoDConfig(enabled=True, schedule="fixed", layers=list(range(2, 32)), ratio=0.5), 32)
    assert ours == official_ratios(mod_target_layers="deep_all_include_last", mod_router_factor=0.5)


def test_prd_on_other_depths_spreads_the_curve_documented_departure():
    """The official curve hard-codes L - 1 = 31 (PMOD 656): on 4 layers no layer would drop
    a token. megamod spreads it over the model's layers (`schedule.py` docstring)."""
    assert official_ratios(4) == [None] * 4
    assert layer_ratios(MoDConfig(enabled=True), 4) == [None, 0.75, pytest.approx(0.25), 0.15]


# ------------------------------------------------------------------------------ kept count


def kept_vision_per_sample(counts: list[int], ratio: float) -> list[int]:
    """megamod's kept vision tokens per sample, a sample of n vision tokens per column."""
    s = max(counts) + 3
    is_image = torch.arange(s).unsqueeze(1) < torch.tensor(counts).unsqueeze(0)
    weights = torch.rand(s, len(counts), generator=torch.Generator().manual_seed(0))
    kept = select_kept_tokens(weights, is_image, is_image.sum(0), ratio, multiple=8)
    return ((kept.slot >= 0) & is_image).sum(0).tolist()


def test_kept_count_per_sample_equals_the_official():
    ratios = sorted({r for r in layer_ratios(MoDConfig(enabled=True), LLAVA15_LAYERS) if r is not None}
                    | {0.5, 0.3})
    # Small counts, around one LLaVA-1.5 image (576) and a spread up to it; two and more
    # images, LLaVA-NeXT-sized counts (2365 x r(10) is float32's edge).
    small = sorted(set(range(0, 24)) | set(range(24, 600, 17)) | set(range(570, 583)))
    large = [1151, 1152, 1153, 1728, 2304, 2365, 2880, 4730]
    for ratio in ratios:
        for counts in (small, large):
            mask = torch.arange(max(counts)).unsqueeze(0) < torch.tensor(counts).unsqueeze(1)  # [b, s]
            theirs = official.top_k_lengths(mask, ratio).tolist()
            assert kept_vision_per_sample(counts, ratio) == theirs, ratio
    # Where float32 and exact arithmetic part, both codes take float32's answer.
    r10 = layer_ratios(MoDConfig(enabled=True), LLAVA15_LAYERS)[10]
    assert int(2365 * r10) == 1807 and kept_vision_per_sample([2365], r10) == [1808]


# ------------------------------------------------------------------------------ router


@pytest.mark.parametrize("spec", ["tanh_0.2_1", "sigmoid_0.5_0.75", "none_1_0", "tanh_1_-0.5"])
def test_weight_norm_equals_the_official(spec):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 4
    logits[0, :3] = torch.tensor([-30.0, 0.0, 30.0])  # saturated tanh and its middle
    theirs = official.weight_normalization(logits, *official.parse_weight_norm(spec))
    assert torch.equal(WeightNorm(spec)(logits), theirs)
    if spec == "tanh_0.2_1":
        assert theirs.min() >= 0.8 and theirs.max() <= 1.2


def test_router_equals_the_official_zero_init_with_bias():
    hidden = 32
    ours = TokenRouter(hidden, sequence_parallel=False)
    theirs = official.TokenRouter(hidden, official.RECIPE["mod_bias_enabled"], official.RECIPE["mod_special_init"])
    assert ours.linear.bias is not None
    assert torch.equal(ours.linear.weight, theirs.router.weight) and torch.equal(ours.linear.bias, theirs.router.bias)
    assert not ours.linear.weight.any() and not ours.linear.bias.any()  # w = 1 everywhere at start
    draw = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in (ours.linear.weight, ours.linear.bias):
            param.normal_(generator=draw)
        theirs.router.load_state_dict(ours.linear.state_dict())
    x = torch.randn(7, 3, hidden, generator=draw)  # [s, b, h]
    assert torch.equal(ours(x), theirs(x.transpose(0, 1)).t())
    # bf16 activations: megamod's router computes in fp32 (documented), the official in bf16.
    got = ours(x.bfloat16())
    assert got.dtype == torch.float32
    assert torch.equal(got, theirs(x.bfloat16().float().transpose(0, 1)).t())


# ------------------------------------------------------------------------------ selection


def selection_inputs(ties: bool):
    """[b, s] official layout: 5 samples, vision runs of different lengths (one none, one
    everywhere, two images in one), right padding in two."""
    b, s = 5, 48
    draw = torch.Generator().manual_seed(3)
    logits = torch.randn(b, s, generator=draw)
    if ties:
        logits = torch.randint(-1, 2, (b, s), generator=draw).float()
    target = torch.zeros(b, s, dtype=torch.bool)
    target[0, 4:20] = True
    target[1, 2:18] = True
    target[1, 22:38] = True
    target[3, :] = True
    target[4, 6:22] = True
    valid = torch.ones(b, s, dtype=torch.bool)
    valid[0, 30:] = False
    valid[2, 40:] = False
    return logits, target, valid


def megamod_kept(logits, target, ratio, padding=None):
    """megamod's kept-position mask [b, s] (select_kept_tokens is sequence-first)."""
    weights = WeightNorm(official.RECIPE["mod_weight_norm"])(logits.t())
    extra = {}
    if padding is not None:
        extra = dict(padding=padding.t(), padding_per_sample=padding.t().sum(0))
    kept = select_kept_tokens(weights, target.t(), target.t().sum(0), ratio, multiple=8, **extra)
    mask = (kept.slot >= 0).t()
    # Slots hold the kept positions in position order (the official pad_sequence order).
    for j in range(target.shape[0]):
        n = int(mask[j].sum())
        assert kept.index[:n, j].tolist() == mask[j].nonzero().flatten().tolist()
    return mask


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.15])
def test_selection_equals_the_official(ratio):
    logits, target, valid = selection_inputs(ties=False)
    # No padding (the official code's branch for a batch without a 2-d mask, PMOD 556-557).
    _, theirs_vision, theirs = official.select(logits, target, None, ratio, NORM)
    ours = megamod_kept(logits, target, ratio)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours & target, theirs_vision)
    # Inference with left or right padding: megamod drops it as the official 2-d mask does.
    _, _, theirs = official.select(logits, target, valid, ratio, NORM)
    assert torch.equal(megamod_kept(logits, target, ratio, padding=~valid), theirs)
    # Training: megamod keeps padding in the layer (documented: at the end, nobody attends
    # to it); the official 2-d mask drops it (PMOD 554-555). Same vision and text tokens.
    assert torch.equal(ours & valid, theirs) and torch.equal(ours & ~valid, ~valid)


@pytest.mark.parametrize("ratio", [0.5, 0.15])
def test_ties_keep_a_top_k_broken_by_position_documented_departure(ratio):
    """Router weights with ties: both codes keep k vision tokens of top weight; which of
    the tied ones torch.topk returns is unspecified (on CPU not the first ones), megamod
    keeps the earliest positions."""
    logits, target, _ = selection_inputs(ties=True)
    weights, theirs_vision, _ = official.select(logits, target, None, ratio, NORM)
    ours = megamod_kept(logits, target, ratio) & target
    k = official.top_k_lengths(target, ratio)
    assert ours.sum(1).tolist() == theirs_vision.sum(1).tolist() == k.tolist()
    for j in range(target.shape[0]):
        if k[j] == 0:
            continue
        assert sorted(weights[j][ours[j]].tolist()) == sorted(weights[j][theirs_vision[j]].tolist())
        # megamod: among the tokens of the lowest kept weight, the earliest ones.
        lowest = weights[j][ours[j]].min()
        tied = (target[j] & (weights[j] == lowest)).nonzero().flatten().tolist()
        taken = (ours[j] & (weights[j] == lowest)).nonzero().flatten().tolist()
        assert taken == tied[: len(taken)]


def test_saturated_weights_still_keep_k_vision_tokens():
    """Undocumented edge: the official code masks non-target logits to -inf *before*
    TanhNorm (PMOD 530-532), so text and padding get weight 0.8, the same as a vision token
    whose tanh saturates (fp32: logit < -9; bf16, the official router's dtype: logit below
    about -2.67 rounds to the same 0.80078125). Which of the tied positions torch.topk
    returns is unspecified: it may pick text or padding and keep fewer than k vision
    tokens (on CPU it happens not to here). megamod masks after the norm: it keeps k
    vision tokens whatever their weights."""
    logits, target, _ = selection_inputs(ties=False)
    logits = torch.where(target, torch.full_like(logits, -30.0), logits)
    logits[target.cumsum(1) == 1] = 5.0  # one unsaturated vision token per sample
    weights, _, _ = official.select(logits, target, None, 0.5, NORM)
    assert (weights[target] == 0.8).sum() > 0 and torch.all(weights[~target] == 0.8)  # the tie
    ours = megamod_kept(logits, target, 0.5) & target
    assert ours.sum(1).tolist() == official.top_k_lengths(target, 0.5).tolist()


# ------------------------------------------------------------------------------ the layer


@pytest.fixture(scope="module")
def world():
    with world_of_one(QUIET):
        yield


def build(overrides: list[str], std: float = 0.5, all_weights: bool = False):
    """The tiny model with random routers (and, with `all_weights`, random matrices)."""
    from megamod.models.build import build_model

    model = build_model(load_config(TINY_CONFIG, QUIET + overrides), load_tokenizer("tiny"))
    draw = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if ".mod_router." in name or (all_weights and param.dim() >= 2):
            param.data.normal_(0.0, std, generator=draw)
    return model.eval()


@pytest.fixture(scope="module")
def batch(world):
    from megamod.training.loop import build_loader

    with build_loader(load_config(TINY_CONFIG, QUIET), load_tokenizer("tiny")) as loader:
        micro_batches = loader.next_step()
    return {k: torch.cat([m[k] for m in micro_batches]) for k in micro_batches[0]}


def stand_in_decoder(layer, rope: torch.Tensor):
    """The official `LlamaDecoderLayer.forward_return_residual` (LLAMA 854-883) and plain
    `forward` (LLAMA 793-815) with this megatron-core layer's weights: per sample, causal
    attention over its unpadded kept tokens (flash-attention's varlen path), RoPE at the
    given positions (rope: the [P, 1, 1, d] table)."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    def one(sub: torch.Tensor, positions: torch.Tensor):  # [n, h], [n]
        residual, _ = TransformerLayer._forward_attention(
            layer, sub.unsqueeze(1), rotary_pos_emb=rope[positions])
        out, bias = layer.mlp(layer.pre_mlp_layernorm(residual))
        if bias is not None:
            out = out + bias
        return out[:, 0], residual[:, 0]

    def forward_return_residual(kept_tokens, kept_attention_mask_2d, kept_position_ids):
        outputs, residuals = torch.zeros_like(kept_tokens), torch.zeros_like(kept_tokens)
        for i in range(kept_tokens.shape[0]):
            n = kept_tokens.shape[1] if kept_attention_mask_2d is None else int(kept_attention_mask_2d[i].sum())
            outputs[i, :n], residuals[i, :n] = one(kept_tokens[i, :n], kept_position_ids[i, :n])
        return outputs, residuals

    def decoder_layer(hidden_states):  # [b, s, h], no padding
        positions = torch.arange(hidden_states.shape[1])
        rows = [sum(one(x, positions)) for x in hidden_states]
        return torch.stack(rows)

    return forward_return_residual, decoder_layer


def official_layer_output(layer, x, rope, is_image, attention_mask_2d):
    """The official ModLayer.forward on megamod's layer input x [s, b, h]: [s, b, h]."""
    forward_return_residual, decoder_layer = stand_in_decoder(layer, rope)
    router = layer.mod_router.linear
    y = official.mod_layer_forward(
        x.transpose(0, 1), attention_mask_2d, torch.arange(x.shape[0]).unsqueeze(0), is_image.t(),
        lambda h: router(h).squeeze(-1), layer.ratio, NORM, forward_return_residual, decoder_layer)
    return y.transpose(0, 1)


def capture(model, tokens, images):
    """Every MoD layer's input, output and RoPE table in one forward."""
    captured = {}

    def hook(module, args, kwargs, output):
        captured[module.layer_number] = (kwargs["hidden_states"], output[0], kwargs["rotary_pos_emb"])

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in model.mod_layers()]
    try:
        with torch.no_grad():
            model(tokens, images)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def test_layer_output_equals_the_official_mod_layer(world, batch):
    """PRD on the tiny model (layers 1-3 keep 75 %, 25 %, 15 %), random routers, a micro-
    batch of 8 right-padded samples with 0, 1 and 2 images."""
    model = build(["mod.enabled=true"])
    assert [m.ratio for m in model.mod_layers()] == pytest.approx([0.75, 0.25, 0.15])
    tokens = batch["tokens"]
    is_image = (tokens == load_tokenizer("tiny").image_token_id).t()  # [s, b]
    valid = tokens != load_tokenizer("tiny").pad_id  # [b, s], right padding
    assert not valid.all() and is_image.any(0).any() and not is_image.any(0).all()
    captured = capture(model, tokens, batch["images"])
    assert torch.equal(model.micro_batch.token_is_image, is_image)
    skipped = 0
    for layer in model.mod_layers():
        x, y, rope = captured[layer.layer_number]
        with torch.no_grad():
            weights = WeightNorm("tanh_0.2_1")(layer.mod_router(x))
            for j in range(x.shape[1]):  # no ties among a sample's vision weights
                vision = weights[is_image[:, j], j]
                assert vision.unique().numel() == vision.numel()
            # The official training forward (2-d mask: padding neither kept nor changed).
            theirs = official_layer_output(layer, x, rope, is_image, valid)
            # The official forward without a padding mask (PMOD 556-557: every non-target
            # token kept, padding included), which is what megamod does in training.
            theirs_all = official_layer_output(layer, x, rope, is_image, None)
        real = valid.t()
        torch.testing.assert_close(y[real], theirs[real], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y, theirs_all, atol=1e-5, rtol=1e-5)
        assert torch.equal(theirs[~real], x[~real])  # the official leaves padding as it came
        _, theirs_vision, _ = official.select(
            layer.mod_router(x).t(), is_image.t(), valid, layer.ratio, NORM)
        skipped += int((is_image.t() & ~theirs_vision).sum())
    assert skipped > 0


def test_a_batch_without_images_runs_the_plain_layer(world, batch):
    """PMOD 507-521: no MoD target in the micro-batch, the plain decoder layer."""
    model = build(["mod.enabled=true"])
    image = load_tokenizer("tiny").image_token_id
    tokens = batch["tokens"][~(batch["tokens"] == image).any(1)]
    assert tokens.shape[0] > 0
    captured = capture(model, tokens, batch["images"][:0])
    for layer in model.mod_layers():
        x, y, rope = captured[layer.layer_number]
        with torch.no_grad():
            theirs = official_layer_output(layer, x, rope, torch.zeros(x.shape[:2], dtype=torch.bool), None)
        torch.testing.assert_close(y, theirs, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ KV cache


def test_prefill_cache_and_decode_equal_the_official(world):
    """Batch 1 (the official code's inference, PMOD 612-625 `squeeze(0)`): at prefill each
    MoD layer's output equals the official one and its cache holds exactly the official
    kept tokens (positions); decode tokens (text: PMOD 344 passes no target mask after
    prefill, PMOD 507-521 the plain layer) attend to that layer's kept tokens and their own
    predecessors, at positions continuing the whole prompt's."""
    from megamod.inference.generate import Generator

    config = load_config(TINY_CONFIG, QUIET + ["mod.enabled=true"])
    tokenizer = load_tokenizer("tiny")
    model = build(["mod.enabled=true"], std=0.1, all_weights=True)
    generator = Generator(model, tokenizer, config)
    image, patches = tokenizer.image_token_id, config.model.vision.num_patches
    prompt = [tokenizer.bos_id, 40, 41] + [image] * patches + [42, 43, 44, 45]
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    calls: dict[int, list] = {}

    def hook(module, args, kwargs, output):
        calls.setdefault(module.layer_number, []).append(
            (kwargs["hidden_states"], output[0], kwargs["inference_context"]))

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in model.mod_layers()]
    try:
        generator.generate([prompt], images, max_new_tokens=3, stop_at_eos=False)
    finally:
        for handle in handles:
            handle.remove()

    s = len(prompt)
    is_image = (torch.tensor(prompt) == image).unsqueeze(1)  # [s, 1]
    rope = model.language_model.rotary_pos_emb(s + 3)
    for layer in model.mod_layers():
        (x, y, cache), *decode = calls[layer.layer_number]
        assert x.shape[0] == s and len(decode) == 2
        with torch.no_grad():
            theirs = official_layer_output(layer, x, rope, is_image, None)
            _, _, kept = official.select(layer.mod_router(x).t(), is_image.t(), None, layer.ratio, NORM)
        torch.testing.assert_close(y, theirs, atol=1e-5, rtol=1e-5)
        positions = kept[0].nonzero().flatten()
        layout = cache.layouts[layer.layer_number]
        n = len(positions)
        assert n < s
        assert layout.positions[:n, 0].tolist() == positions.tolist()
        assert layout.positions[n:, 0].tolist() == [s, s + 1] and bool(layout.valid.all())
        # Decode: the plain layer over [kept prompt tokens, new tokens so far] (what the
        # official cache holds), the new token last.
        sequence, at = x[positions, 0], positions
        for step, (x_new, y_new, _) in enumerate(decode):
            sequence = torch.cat([sequence, x_new[:, 0]])
            at = torch.cat([at, torch.tensor([s + step])])
            fwd, _ = stand_in_decoder(layer, rope)
            with torch.no_grad():
                out, residual = fwd(sequence.unsqueeze(0), None, at.unsqueeze(0))
            torch.testing.assert_close(y_new[0, 0], (out + residual)[0, -1], atol=1e-5, rtol=1e-5)
