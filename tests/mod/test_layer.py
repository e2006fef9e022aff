"""The MoD layer against independent references, in this process (a world of one, fp32).

- Selection: `select_kept_tokens` equals a per-sample loop over torch.topk.
- With zero routers (w = 1) and ratio 1 on every layer the model is the dense model:
  identical logits, with dense and with MoE layers.
- With ratio < 1 and random routers, each sample's kept tokens equal megatron-core's plain
  layer run on that sample's kept subsequence alone (original RoPE positions), combined as
  STRing says: text h + f, kept vision h + w f; skipped vision tokens are w x.
"""

from __future__ import annotations

import pytest
import torch

from megamod.config import load_config
from megamod.data.tokenizer import load_tokenizer
from megamod.mod.layer import select_kept_tokens
from tests.launcher import TINY_CONFIG, world_of_one

QUIET = ["checkpoint.save_dir=null", "checkpoint.save_interval=null", "logging.tensorboard_dir=null"]


def test_selection_equals_per_sample_topk():
    s, b = 40, 5
    generator = torch.Generator().manual_seed(0)
    weights = torch.rand(s, b, generator=generator)
    is_image = torch.zeros(s, b, dtype=torch.bool)
    is_image[5:21, 0] = True  # 16 vision tokens
    is_image[3:35, 1] = True  # 32
    is_image[10:13, 3] = True  # 3 (trunc(3 x 0.3) = 0 kept)
    is_image[:, 4] = True  # every position
    weights[:, 2] = 0.5  # text only, ties everywhere
    ratio = 0.3
    vision = is_image.sum(0)
    kept = select_kept_tokens(weights, is_image, vision, ratio, multiple=8)
    longest = 0
    for j in range(b):
        k = int(vision[j].item() * ratio)
        candidates = is_image[:, j].nonzero().flatten()
        chosen = candidates[weights[candidates, j].topk(k).indices] if k else candidates[:0]
        expected = sorted(set((~is_image[:, j]).nonzero().flatten().tolist()) | set(chosen.tolist()))
        n = len(expected)
        longest = max(longest, n)
        assert kept.index[:n, j].tolist() == expected, j
        assert kept.valid[:, j].tolist() == [True] * n + [False] * (kept.index.shape[0] - n)
        assert (kept.slot[:, j] >= 0).nonzero().flatten().tolist() == expected
        assert kept.slot[expected, j].tolist() == list(range(n))
    assert kept.index.shape[0] == -(-longest // 8) * 8
    assert kept.kept_vision == sum(int(v * ratio) for v in vision.tolist())


@pytest.fixture(scope="module")
def world():
    with world_of_one(QUIET):
        yield


def build(overrides: list[str], state_dict: dict | None = None):
    from megamod.models.build import build_model

    model = build_model(load_config(TINY_CONFIG, QUIET + overrides), load_tokenizer("tiny"))
    if state_dict is not None:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        assert not unexpected and all(".mod_router." in k for k in missing)
    return model.eval()


@pytest.fixture(scope="module")
def batch(world):
    from megamod.training.loop import build_loader

    with build_loader(load_config(TINY_CONFIG, QUIET), load_tokenizer("tiny")) as loader:
        micro_batches = loader.next_step()
    batch = {k: torch.cat([m[k] for m in micro_batches]) for k in micro_batches[0]}
    images_per_sample = (batch["tokens"] == load_tokenizer("tiny").image_token_id).sum(1)
    assert images_per_sample.min() == 0 or images_per_sample.max() > images_per_sample.min()
    return batch


ALL_LAYERS = ["mod.enabled=true", "mod.schedule=fixed", "mod.ratio=1.0", "mod.layers=[0,1,2,3]"]


@pytest.mark.parametrize("moe", [[], ["moe.num_experts=4", "moe.layer_freq=2"]], ids=["dense", "moe"])
def test_ratio_one_with_zero_routers_is_the_dense_model(world, batch, moe):
    dense = build(moe)
    mod = build(moe + ALL_LAYERS, dense.state_dict())
    assert len(mod.mod_layers()) == 4
    with torch.no_grad():
        expected = dense(batch["tokens"], batch["images"])
        got = mod(batch["tokens"], batch["images"])
    assert torch.equal(got, expected)


def test_kept_tokens_run_the_layer_on_their_subsequence(world, batch):
    """Layer 1 of a fixed-ratio-0.5 MoD model, random router, against the plain layer."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    model = build(["mod.enabled=true", "mod.schedule=fixed", "mod.ratio=0.5", "mod.layers=[1]"])
    (layer,) = model.mod_layers()
    generator = torch.Generator().manual_seed(1)
    for param in layer.mod_router.parameters():
        param.data.normal_(0.0, 0.5, generator=generator)
    captured = {}

    def keep(module, args, kwargs, output):
        captured.update(x=kwargs["hidden_states"], rope=kwargs["rotary_pos_emb"], y=output[0])

    handle = layer.register_forward_hook(keep, with_kwargs=True)
    with torch.no_grad():
        model(batch["tokens"], batch["images"])
    handle.remove()
    x, rope, y = captured["x"], captured["rope"], captured["y"]  # [s, b, h], [s, 1, 1, d]
    is_image = model.micro_batch.token_is_image
    w = 0.2 * torch.tanh(layer.mod_router.linear(x).squeeze(-1)) + 1  # TanhNorm, [s, b]

    checked_skipped = 0
    for j in range(x.shape[1]):
        vision = is_image[:, j].nonzero().flatten()
        k = int(len(vision) * 0.5)
        chosen = vision[w[vision, j].topk(k).indices] if k else vision[:0]
        kept = torch.tensor(sorted(set((~is_image[:, j]).nonzero().flatten().tolist())
                                   | set(chosen.tolist())))
        sub = x[kept, j : j + 1]  # [n, 1, h]
        with torch.no_grad():
            dense_out, _ = TransformerLayer.forward(layer, hidden_states=sub,
                                                    rotary_pos_emb=rope[kept])
            h, _ = TransformerLayer._forward_attention(layer, sub, rotary_pos_emb=rope[kept])
        f = dense_out - h  # the MLP's output on the kept tokens
        weight = torch.where(is_image[kept, j], w[kept, j], 1.0)
        expected = h[:, 0] + weight.unsqueeze(-1) * f[:, 0]
        torch.testing.assert_close(y[kept, j], expected, atol=1e-5, rtol=1e-5)
        skipped = sorted(set(vision.tolist()) - set(chosen.tolist()))
        torch.testing.assert_close(y[skipped, j], w[skipped, j].unsqueeze(-1) * x[skipped, j])
        checked_skipped += len(skipped)
    assert checked_skipped > 0


def test_router_scores_in_fp32_without_keeping_an_fp32_copy_of_its_input():
    """The same logits and gradients as upcasting the input and using F.linear, while what
    autograd keeps for backward is the input in its own dtype, not a [s, b, h] fp32 copy."""
    from megamod.mod.router import TokenRouter

    generator = torch.Generator().manual_seed(0)
    router = TokenRouter(64, sequence_parallel=False)
    for param in router.parameters():
        param.data.normal_(0, 0.5, generator=generator)
    x = torch.randn(12, 3, 64, generator=generator).to(torch.bfloat16).requires_grad_()
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        logits = router(x)
    assert logits.dtype == torch.float32
    assert not [t for t in kept if t.dtype == torch.float32 and t.numel() >= x.numel()]
    upstream = torch.nn.Linear(64, 1)
    upstream.load_state_dict(router.linear.state_dict())
    x_ref = x.detach().clone().requires_grad_()
    ref = upstream(x_ref.float()).squeeze(-1)
    torch.testing.assert_close(logits, ref, atol=0, rtol=0)
    grad = torch.randn(12, 3, generator=generator)
    logits.backward(grad), ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=0, rtol=0)
    for ours, theirs in zip(router.linear.parameters(), upstream.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-6, rtol=1e-5)
