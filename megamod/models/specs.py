"""Layer specs: which megatron-core modules build each part of the model.

The model builds what it is given; the choices live here. Transformer-engine modules
when TE and a GPU are present, megatron-core's local (pure torch) modules otherwise,
with attention computed by torch's `scaled_dot_product_attention`
(`megamod.models.core_attention`) instead of upstream's local `DotProductAttention`.
The decoder is a list of layer specs: dense layers, and MoE layers where
`moe.layer_freq` puts them (megatron-core's MoELayer with our recording router), and
p-MoD's MoD layers (`megamod.mod.layer.MoDTransformerLayer`) where `mod` puts them,
around either kind.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.models.vision.vit_layer_specs import (
    get_vit_layer_with_local_spec,
    get_vit_layer_with_transformer_engine_spec,
)
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, get_transformer_layer_offset

from megamod.config import MoDConfig
from megamod.models.core_attention import SDPADotProductAttention
from megamod.mod.layer import MoDTransformerLayer
from megamod.mod.schedule import layer_ratios
from megamod.moe.router import TopKRouterWithStats


def transformer_engine_available() -> bool:
    """TE kernels need a GPU; TE itself cannot even be imported without CUDA."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def decoder_block_spec(
    config: TransformerConfig, use_te: bool, mod: Optional[MoDConfig] = None, packed: bool = False
) -> TransformerBlockSubmodules:
    """Llama-style decoder layers (causal self-attention + MLP or MoE), one spec per layer
    of this pipeline stage.

    megatron-core's own block spec reads `config.moe_layer_freq` to place MoE layers;
    their router becomes `TopKRouterWithStats` (upstream's TopKRouter that also reports
    where it sent each token, for per-modality expert load). Layers that p-MoD's schedule
    names become MoD layers with their keep ratio.

    `packed` (several samples a row): core attention is SDPA, within each sample
    (`PackedSeqParams`, `sbhd`), even with transformer-engine. Departure from Megatron-LM's
    packed SFT, which lays rows out as `thd` for TE's varlen kernels: TE cannot be built on
    the machines this project is tested on (no CUDA here, none on the GPU machine lent so
    far), so that path could not be checked; SDPA's causal kernels per sample compute no
    padding and no attention across samples (`core_attention` has the measurements)."""
    block = get_gpt_decoder_block_spec(
        config, use_transformer_engine=use_te, normalization=config.normalization
    )
    for spec in block.layer_specs:
        if packed or not use_te:
            spec.submodules.self_attention.submodules.core_attention = SDPADotProductAttention
        mlp = spec.submodules.mlp
        if isinstance(mlp, ModuleSpec) and mlp.module is MoELayer:
            mlp.submodules.router = TopKRouterWithStats
    if mod is not None and mod.enabled:
        # The block spec holds this pipeline stage's layers, from the layer `offset` on.
        offset = get_transformer_layer_offset(config)
        ratios = layer_ratios(mod, config.num_layers)[offset : offset + len(block.layer_specs)]
        block.layer_specs = [
            spec if ratio is None else _mod_layer(spec, ratio, mod)
            for spec, ratio in zip(block.layer_specs, ratios)
        ]
    return block


def _mod_layer(spec: ModuleSpec, ratio: float, mod: MoDConfig) -> ModuleSpec:
    assert spec.module is TransformerLayer, f"MoD wraps TransformerLayer, not {spec.module}"
    params = dict(spec.params, ratio=ratio, weight_norm=mod.weight_norm,
                  kept_length_multiple=mod.kept_length_multiple)
    return ModuleSpec(module=MoDTransformerLayer, params=params, submodules=spec.submodules)


def vision_layer_spec(use_te: bool) -> ModuleSpec:
    """A ViT layer with bidirectional attention."""
    if use_te:
        return get_vit_layer_with_transformer_engine_spec()
    spec = copy.deepcopy(get_vit_layer_with_local_spec())
    # Upstream's local ViT spec asks for a causal mask (its TE spec does not): a CLIP
    # encoder attends in both directions.
    spec.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.no_mask
    spec.submodules.self_attention.submodules.core_attention = SDPADotProductAttention
    # Checkpoint names as the TE spec's fused norm+linear modules have them (upstream's
    # local GPT spec does this for the decoder, its ViT spec does not): a checkpoint
    # written on CPU loads on GPU with transformer-engine, and the other way round.
    spec.submodules.sharded_state_dict_keys_map = {
        "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
        "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
    }
    return spec


def vision_norm(use_te: bool) -> type:
    """The ViT's pre-layernorm (CLIP's `pre_layrnorm`)."""
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return WrappedTorchNorm


def projector_submodules(use_te: bool) -> MLPSubmodules:
    """LLaVA's 2-layer MLP projector: column- then row-parallel linear."""
    if use_te:
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TERowParallelLinear,
        )

        return MLPSubmodules(linear_fc1=TEColumnParallelLinear, linear_fc2=TERowParallelLinear)
    return MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
