"""`SDPADotProductAttention` against megatron-core's own local `DotProductAttention`: the
same inputs, forward and gradients, in a world of one (fp32 on CPU).

Cases: causal, no mask, explicit boolean masks (with rows masked everywhere, with sq != sk
as a KV-cache decode step has them, per sample and per head), packed rows (against the
per-sample causal mask they mean), GQA, heads per TP partition,
softmax scale and query-key layer scaling; then the tiny LLaVA built with each attention
(dense and MoD, whose kept-token attention relies on the causal mask) on the same weights.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megamod.config import load_config
from megamod.data.tokenizer import load_tokenizer
from megamod.micro_batch import packed_seq_params
from megamod.models.core_attention import SDPADotProductAttention
from tests.launcher import TINY_CONFIG, world_of_one

QUIET = ["checkpoint.save_dir=null", "checkpoint.save_interval=null", "logging.tensorboard_dir=null"]


@pytest.fixture(scope="module")
def world():
    with world_of_one(QUIET):
        yield


def transformer_config(
    heads: int = 4, groups: int = 2, head_dim: int = 16, **kwargs: object
) -> TransformerConfig:
    kwargs = dict(attention_dropout=0.0, hidden_dropout=0.0) | kwargs
    return TransformerConfig(
        num_layers=4, hidden_size=heads * head_dim, num_attention_heads=heads,
        num_query_groups=groups, use_cpu_initialization=True, masked_softmax_fusion=False, **kwargs,
    )


def both(config: TransformerConfig, mask_type: AttnMaskType, tp: int = 1, **kwargs):
    """Upstream's module and ours, built alike (`tp`: a TP group of that size)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    args = dict(config=config, layer_number=kwargs.pop("layer_number", 1), attn_mask_type=mask_type,
                attention_type="self", **kwargs)
    if tp > 1:  # only the group's size is read at construction
        args["pg_collection"] = SimpleNamespace(tp=SimpleNamespace(size=lambda: tp))
    return DotProductAttention(**args), SDPADotProductAttention(**args)


def run(module, q, k, v, mask, mask_type=None, **kwargs):
    """Output and the gradients of q, k, v for a fixed random output gradient."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = module(q, k, v, mask, attn_mask_type=mask_type, **kwargs)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(7)))
    return [out, q.grad, k.grad, v.grad]


def inputs(sq: int, sk: int, b: int, heads: int, groups: int, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(sq, b, heads, d, generator=g), torch.randn(sk, b, groups, d, generator=g),
            torch.randn(sk, b, groups, d, generator=g))


def assert_same(upstream, ours, q, k, v, mask, mask_type=None):
    expected, got = run(upstream, q, k, v, mask, mask_type), run(ours, q, k, v, mask, mask_type)
    for name, e, o in zip(["output", "dq", "dk", "dv"], expected, got):
        assert not o.isnan().any(), name
        torch.testing.assert_close(o, e, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("groups", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_causal(world, groups):
    upstream, ours = both(transformer_config(groups=groups), AttnMaskType.causal)
    assert_same(upstream, ours, *inputs(24, 24, 2, 4, groups), mask=None)


def test_no_mask(world):
    upstream, ours = both(transformer_config(groups=4), AttnMaskType.no_mask)
    assert_same(upstream, ours, *inputs(17, 17, 3, 4, 4), mask=None)


def test_single_query_without_mask_sees_every_key(world):
    """A decode step (sq = 1) under a causal layer without a mask: upstream applies none."""
    upstream, ours = both(transformer_config(), AttnMaskType.causal)
    assert_same(upstream, ours, *inputs(1, 9, 2, 4, 2), mask=None)


@pytest.mark.parametrize("mask_type", [AttnMaskType.causal, AttnMaskType.no_mask, AttnMaskType.padding])
@pytest.mark.parametrize("sq,sk,heads_dim", [(12, 12, 1), (3, 10, 1), (1, 10, 4), (5, 10, 4)])
def test_explicit_mask_with_fully_masked_rows(world, mask_type, sq, sk, heads_dim):
    """The mask alone decides, whatever the mask type; rows masked everywhere get upstream's
    uniform weights (never NaN)."""
    b = 3
    upstream, ours = both(transformer_config(), mask_type)
    mask = torch.rand(b, heads_dim, sq, sk, generator=torch.Generator().manual_seed(3)) < 0.4
    mask[0, :, 0] = True  # a row masked everywhere
    mask[1] = True  # a sample masked everywhere
    mask[2, 0, -1] = False  # a row masked nowhere
    assert_same(upstream, ours, *inputs(sq, sk, b, 4, 2), mask=mask)


def test_broadcast_mask_and_the_forward_mask_type(world):
    """A [1, 1, sq, sk] mask for the whole batch; a no_mask type passed to forward does not
    switch an explicit mask off."""
    upstream, ours = both(transformer_config(), AttnMaskType.causal)
    mask = torch.ones(6, 6, dtype=torch.bool).triu(1)[None, None]
    assert_same(upstream, ours, *inputs(6, 6, 2, 4, 2), mask=mask, mask_type=AttnMaskType.no_mask)


def test_forward_no_mask_type_overrides_causal(world):
    """As transformer-engine's attention does (upstream's local one ignores the argument):
    against upstream built without a mask."""
    upstream, _ = both(transformer_config(), AttnMaskType.no_mask)
    _, ours = both(transformer_config(), AttnMaskType.causal)
    assert_same(upstream, ours, *inputs(8, 8, 2, 4, 2), mask=None, mask_type=AttnMaskType.no_mask)


def test_heads_per_tensor_parallel_partition(world):
    """TP=2: 2 of 4 heads and 1 of 2 query groups per rank."""
    upstream, ours = both(transformer_config(), AttnMaskType.causal, tp=2)
    assert ours.num_attention_heads_per_partition == 2
    assert ours.num_query_groups_per_partition == 1
    assert_same(upstream, ours, *inputs(10, 10, 2, 2, 1), mask=None)


@pytest.mark.parametrize("layer_scaling", [False, True])
def test_softmax_scale_and_layer_scaling(world, layer_scaling):
    config = transformer_config(apply_query_key_layer_scaling=layer_scaling)
    upstream, ours = both(config, AttnMaskType.causal, layer_number=3, softmax_scale=0.7)
    assert_same(upstream, ours, *inputs(16, 16, 2, 4, 2), mask=None)


def test_attention_dropout_in_training_only(world):
    config = transformer_config(attention_dropout=0.5)
    upstream, ours = both(config, AttnMaskType.no_mask)
    q, k, v = inputs(16, 16, 2, 4, 2)
    ours.eval()
    upstream.eval()
    torch.testing.assert_close(ours(q, k, v, None), upstream(q, k, v, None), atol=1e-5, rtol=1e-5)
    ours.train()
    dropped = ours(q, k, v, None)
    assert not torch.allclose(dropped, ours.eval()(q, k, v, None), atol=1e-3)


@pytest.mark.parametrize("groups", [4, 2], ids=["mha", "gqa"])
def test_packed_rows_attend_within_each_sample(world, groups):
    """Packed rows (`packed_seq_params`, one kernel call per sequence) against upstream's
    module with the per-sample causal mask they mean: a row of samples of 5, 1 and 7
    positions then padding, a row one sample fills, a row without samples. Padding attends
    within itself (its own sequence), every position is compared."""
    s, lengths = 16, [[5, 1, 7], [16], []]
    params = packed_seq_params(torch.tensor([[5, 16, 0], [1, 0, 0], [7, 0, 0]]), s)
    assert params.cu_seqlens_q.tolist() == [0, 5, 6, 13, 16, 32, 48]
    assert (params.qkv_format, params.max_seqlen_q) == ("sbhd", 16)
    segments = torch.full((len(lengths), s), -1)
    for row, samples in enumerate(lengths):
        start = 0
        for j, n in enumerate(samples):
            segments[row, start : start + n] = j
            start += n
    later = torch.ones(s, s, dtype=torch.bool).triu(1)
    mask = ((segments[:, :, None] != segments[:, None, :]) | later).unsqueeze(1)
    upstream, ours = both(transformer_config(groups=groups), AttnMaskType.causal)
    q, k, v = inputs(s, s, len(lengths), 4, groups)
    expected = run(upstream, q, k, v, mask)
    got = run(ours, q, k, v, None, packed_seq_params=params)
    for name, e, o in zip(["output", "dq", "dk", "dv"], expected, got):
        torch.testing.assert_close(o, e, atol=1e-5, rtol=1e-5, msg=name)


def test_packed_rows_refused_when_malformed(world):
    _, ours = both(transformer_config(), AttnMaskType.causal)
    q, k, v = inputs(8, 8, 2, 4, 2)
    params = packed_seq_params(torch.tensor([[3, 8], [5, 0]]), 8)
    with pytest.raises(ValueError, match="no attention_mask"):
        ours(q, k, v, torch.zeros(2, 1, 8, 8, dtype=torch.bool), packed_seq_params=params)
    with pytest.raises(ValueError, match="'thd'"):
        ours(q, k, v, None, packed_seq_params=dataclasses.replace(params, qkv_format="thd"))
    crossing = torch.tensor([0, 3, 10, 16], dtype=torch.int32)
    with pytest.raises(ValueError, match="crosses rows"):
        ours(q, k, v, None, packed_seq_params=dataclasses.replace(
            params, cu_seqlens_q=crossing, cu_seqlens_kv=crossing))
    with pytest.raises(ValueError, match="do not cover"):
        ours(*inputs(8, 8, 3, 4, 2), None, packed_seq_params=params)
    with pytest.raises(ValueError, match="row 1 holds 9 tokens"):
        packed_seq_params(torch.tensor([[3, 9], [5, 0]]), 8)


def test_bf16(world):
    """bf16 in, bf16 out, close to upstream's fp32 result on the same (rounded) inputs."""
    upstream, _ = both(transformer_config(), AttnMaskType.causal)
    _, ours = both(transformer_config(bf16=True, params_dtype=torch.bfloat16), AttnMaskType.causal)
    q, k, v = (t.bfloat16() for t in inputs(32, 32, 2, 4, 2))
    got = ours(q, k, v, None)
    assert got.dtype == torch.bfloat16
    expected = upstream(q.float(), k.float(), v.float(), None)
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-2)


def test_refuses_what_it_cannot_mean(world):
    _, ours = both(transformer_config(), AttnMaskType.causal)
    q, k, v = inputs(4, 6, 1, 4, 2)
    with pytest.raises(ValueError, match="sq == sk"):
        ours(q, k, v, None)
    with pytest.raises(TypeError, match="boolean"):
        ours(q, k, v, torch.zeros(1, 1, 4, 6))
    with pytest.raises(ValueError, match="sliding-window"):
        both(transformer_config(window_size=(4, 0)), AttnMaskType.causal)


@pytest.mark.parametrize("overrides", [[], ["mod.enabled=true", "mod.schedule=fixed", "mod.ratio=0.5"]],
                         ids=["dense", "mod"])
def test_tiny_llava_same_loss_and_gradients_as_upstream_attention(world, monkeypatch, overrides):
    """The model as specs.py builds it (SDPA in the ViT and the decoder) against the same
    model with upstream's local attention, on the same weights and batch."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megamod.models import specs
    from megamod.models.build import build_model
    from megamod.training.loop import build_loader

    config = load_config(TINY_CONFIG, QUIET + overrides)
    tokenizer = load_tokenizer("tiny")
    ours = build_model(config, tokenizer)
    attentions = [m for m in ours.modules() if isinstance(m, SDPADotProductAttention)]
    assert len(attentions) == config.model.vision.num_built_layers + config.model.language.num_layers
    monkeypatch.setattr(specs, "SDPADotProductAttention", DotProductAttention)
    upstream = build_model(config, tokenizer)
    assert not any(isinstance(m, SDPADotProductAttention) for m in upstream.modules())
    upstream.load_state_dict(ours.state_dict())
    with build_loader(config, tokenizer) as loader:
        batch = loader.next_step()[0]
    assert len(ours.mod_layers()) == (2 if overrides else 0)
    for model in (ours, upstream):
        generator = torch.Generator().manual_seed(1)
        for layer in model.mod_layers():  # random routers: each MoD layer keeps its own tokens
            layer.mod_router.linear.weight.data.normal_(0.0, 0.5, generator=generator)
        loss = model(batch["tokens"], batch["images"], batch["labels"], batch["loss_mask"])
        (loss * batch["loss_mask"]).sum().backward()
    with torch.no_grad():
        logits = [model(batch["tokens"], batch["images"]) for model in (ours, upstream)]
    torch.testing.assert_close(*logits, atol=1e-5, rtol=1e-5)
    upstream_params = dict(upstream.named_parameters())
    for name, param in ours.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name
            torch.testing.assert_close(param.grad, upstream_params[name].grad, atol=1e-5, rtol=1e-4,
                                       msg=name)
