"""LLaVA: CLIP ViT -> 2-layer MLP projector -> Llama-style decoder, from megatron-core.

The three parts are megatron-core's own `CLIPViTModel`, `MultimodalProjector` and
`GPTModel`, wired the way LLaVA-1.5 wires them: the ViT's second-to-last layer output
(CLS dropped) is projected and written over the `<image>` placeholder tokens.

Unlike megatron-core's `LLaVAModel`, which expands one `<image>` token into the patch
count inside the model (a data-dependent sequence length), the data pipeline here
already holds one placeholder token per patch. The sequence length stays fixed, which
sequence parallelism and the MoD router both rely on, and truncation happens where the
text is tokenised. Attribute names follow `LLaVAModel` (`vision_model`,
`vision_projection`, `language_model`) so checkpoint keys line up.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.vision.clip_vit_model import CLIPViTModel
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.moe.moe_layer import BaseMoELayer
from megatron.core.transformer.module import MegatronModule

from megamod.config import Config
from megamod.models import specs
from megamod.models.transformer_configs import transformer_configs
from megamod.micro_batch import MicroBatchInfo, packed_seq_params
from megamod.mod.layer import MoDTransformerLayer
from megamod.mod.stats import MoDStats
from megamod.moe.router import TopKRouterWithStats
from megamod.moe.stats import RoutingStats

# Megatron-LM's GPT datasets mark positions without loss with a loss mask; labels there
# are replaced by this valid id so the vocab-parallel cross entropy can index them.
_MASKED_LABEL = 0


def _misplaced(segments: torch.Tensor) -> torch.Tensor:
    """[1, b] positions of packed rows' `segments` [s, b] that break their layout: samples
    numbered 0, 1, ... from the row's start, each contiguous, then padding (-1) to its end."""
    after_padding = segments.shape[0]  # padding sorts after every sample
    order = segments.masked_fill(segments < 0, after_padding)
    step = order[1:] - order[:-1]
    bad = (step < 0) | ((step > 1) & (order[1:] != after_padding))
    first = (order[:1] != 0) & (order[:1] != after_padding)
    return torch.cat([first, bad]).sum(0, keepdim=True)


class GPTModelWithPositions(GPTModel):
    """megatron-core's GPTModel whose RoPE follows `position_ids` ([1 | b, s]): packed rows
    restart positions at each sample. Upstream's rope computes the angles of positions
    0..s-1 and ignores position_ids (they feed only learned absolute embeddings); here each
    token takes its own position's angles, [s, b, 1, d], which megatron-core's
    `apply_rotary_pos_emb` broadcasts like its [s, 1, 1, d]."""

    def _preprocess(self, input_ids, position_ids, *args, **kwargs):
        output = super()._preprocess(input_ids, position_ids, *args, **kwargs)
        rotary = output[1]
        if rotary is None or position_ids is None:
            return output
        rotary = rotary[:, 0, 0][position_ids].transpose(0, 1).unsqueeze(2)
        return (output[0], rotary, *output[2:])


class LLaVA(MegatronModule):
    """Vision encoder + projector + decoder; `forward` returns per-token losses [b, s]."""

    def __init__(self, config: Config, vocab_size: int, image_token_id: int) -> None:
        configs = transformer_configs(config)
        super().__init__(config=configs.language)
        use_te = specs.transformer_engine_available()
        vision, language = config.model.vision, config.model.language
        self.image_token_id = image_token_id
        self.num_patches = vision.num_patches
        self.sequence_parallel = config.parallel.sequence_parallel
        self.model_type = ModelType.encoder_or_decoder  # read by the schedules
        # Pipeline stages: the first embeds (vision encoder, projector, token embedding),
        # the last computes the loss, each runs its share of the decoder's layers.
        self.pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
        self.post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        self.vision_model = self.vision_projection = None
        if self.pre_process:
            self.vision_model = CLIPViTModel(
                configs.vision,
                specs.vision_layer_spec(use_te),
                ln_pre_impl=specs.vision_norm(use_te),
                add_class_token=True,
                class_token_len=1,
                patch_dim=vision.patch_size,
                img_h=vision.image_size,
                img_w=vision.image_size,
                model_subtype="clip",
            )
            self.vision_projection = MultimodalProjector(
                configs.projector,
                specs.projector_submodules(use_te),
                projector_type="mlp",
                input_size=vision.hidden_size,
            )
        self.share_embeddings_and_output_weights = not language.untie_embeddings_and_output_weights
        self.language_model = GPTModelWithPositions(
            configs.language,
            specs.decoder_block_spec(configs.language, use_te, config.mod, packed=config.data.packing),
            vocab_size=vocab_size,
            max_sequence_length=language.seq_length,
            pre_process=self.pre_process,
            post_process=self.post_process,
            share_embeddings_and_output_weights=self.share_embeddings_and_output_weights,
            position_embedding_type="rope",
            rotary_base=language.rotary_base,
            # Image features are merged into the full sequence first, then scattered.
            scatter_embedding_sequence_parallel=False,
        )
        # What the MoE routers and MoD layers learn about each micro-batch, and what they
        # report back.
        self.micro_batch = MicroBatchInfo()
        self.routing_stats = None
        self.mod_stats = None
        mod_layers = self.mod_layers()
        if config.mod.enabled:  # on every pipeline stage, with MoD layers or not: they log together
            self.mod_stats = MoDStats([layer.layer_number - 1 for layer in mod_layers])
            for layer in mod_layers:
                layer.micro_batch, layer.stats = self.micro_batch, self.mod_stats
        if config.moe.num_experts is not None:
            pattern = config.moe.layer_pattern(language.num_layers)
            self.routing_stats = RoutingStats(pattern, config.moe.num_experts)
            for router in self.routers():
                router.micro_batch, router.stats = self.micro_batch, self.routing_stats
                router.moe = config.moe  # the gate and the evaluation capacity factor
            # megatron-core treats experts as expert-parallel (own grad buffers, reduction
            # group and optimizer) only when EP > 1. Marking them so at every EP size keeps
            # the optimizer (a dense + an expert optimizer, chained) and its checkpoint the
            # same shape, so a run saved at EP=2 resumes at EP=1. At EP=1 the expert
            # data-parallel group is the data-parallel group: the reduction is unchanged.
            for moe_layer in self.parts()["moe"]:
                for param in moe_layer.experts.parameters():
                    param.allreduce = False

    def shared_embedding_or_output_weight(self) -> torch.nn.Parameter | None:
        """The tied embedding / output weight of this stage, for megatron-core's
        `finalize_model_grads` (which all-reduces its gradient between the first and last
        pipeline stages), as megatron-core's `LLaVAModel` surfaces it."""
        return self.language_model.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor: torch.Tensor) -> None:
        # Called by megatron-core's schedules; only meaningful with pipeline parallelism.
        self.language_model.set_input_tensor(input_tensor)

    def embed(self, tokens: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Decoder input [s, b, h]: token embeddings with image features over placeholders."""
        embeddings = self.language_model.embedding(input_ids=tokens, position_ids=None)
        image_mask = tokens == self.image_token_id  # [b, s]
        num_placeholders = int(image_mask.sum())
        if num_placeholders != images.shape[0] * self.num_patches:
            raise ValueError(
                f"batch holds {num_placeholders} image placeholder tokens but "
                f"{images.shape[0]} images x {self.num_patches} patches"
            )
        if images.shape[0] == 0:
            return embeddings
        features = self.vision_model(images)[:, self.vision_model.class_token_len :]
        features = self.vision_projection(features)  # [n, patches, h]
        merged = embeddings.transpose(0, 1).masked_scatter(
            image_mask.unsqueeze(-1), features.to(embeddings.dtype)
        )
        return merged.transpose(0, 1).contiguous()

    def forward(
        self,
        tokens: torch.Tensor,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-token LM loss [b, s] when labels are given, else logits [b, s, v/TP]; on a
        pipeline stage before the last, its output hidden states [s(/TP), b, h]. Every
        stage gets the micro-batch's tokens (what its MoE and MoD layers need to know).

        `padding_mask` [b, s] (True where a row holds no sample) keeps padding out of the
        MoE routers and the MoD layers; packed rows (several samples a row) come with
        `segment_ids` [b, s] (the sample's number in its row, -1 on padding) and
        `position_ids` [b, s] (restarting at 0 in each sample): attention stays within each
        sample (`PackedSeqParams`, built here once for the micro-batch) and RoPE follows the
        positions. A packed row holds its samples in order from its start, padding at its
        end, as `collate_packed` builds it; another layout is refused."""
        decoder_input = None  # a later pipeline stage: the previous stage's output
        if self.pre_process:
            decoder_input = self.embed(tokens, images)
            if self.sequence_parallel:
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)
        self.describe_micro_batch(tokens, loss_mask, padding_mask, segment_ids)
        if labels is not None and loss_mask is not None:
            labels = labels.masked_fill(~loss_mask.bool(), _MASKED_LABEL)
        if position_ids is None:
            position_ids = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
        packed = None
        if segment_ids is not None:
            packed = packed_seq_params(self.micro_batch.tokens_per_segment, tokens.shape[1])
        if padding_mask is not None and self.sequence_parallel:  # each rank's MoE layers: its slice
            tp = parallel_state.get_tensor_model_parallel_world_size()
            padding_mask = padding_mask.chunk(tp, dim=1)[parallel_state.get_tensor_model_parallel_rank()]
        return self.language_model(
            input_ids=None,
            position_ids=position_ids,
            attention_mask=None,
            decoder_input=decoder_input,
            labels=labels,
            packed_seq_params=packed,
            padding_mask=padding_mask,  # megatron-core hands it to the MoE layers' routers
        )

    def describe_micro_batch(
        self,
        tokens: torch.Tensor,
        loss_mask: torch.Tensor | None,
        padding_mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> None:
        """Tell the routers and MoD layers which of their tokens are image tokens, which are
        padding, which sample of a packed row each belongs to, and how many tokens of the
        micro-batch carry loss (for the aux-loss weight); and core attention how long each
        sample of a packed row is."""
        if self.routing_stats is None and self.mod_stats is None and segment_ids is None:
            return  # a dense model on one sample a row: nothing reads it
        info = self.micro_batch
        is_image = (tokens == self.image_token_id).transpose(0, 1)  # router order: [s, b]
        padding = None if padding_mask is None else padding_mask.transpose(0, 1)
        segments = None if segment_ids is None else segment_ids.transpose(0, 1)
        info.token_is_image, info.padding, info.segment_ids = is_image, padding, segments
        if self.mod_stats is not None or segments is not None:
            # The one host sync: MoD layers size buffers from it, core attention cuts rows.
            self._count_on_host(is_image, padding, segments)
        if self.routing_stats is None:
            return  # no MoE router reads what follows
        modality = is_image.long()
        if padding is not None:
            modality = modality.masked_fill(padding, -1)
        if self.sequence_parallel:
            tp = parallel_state.get_tensor_model_parallel_world_size()
            rank = parallel_state.get_tensor_model_parallel_rank()
            modality = modality.chunk(tp, dim=0)[rank]
        info.routed_modality = modality.reshape(-1)
        info.loss_tokens = loss_mask.sum() if loss_mask is not None else None

    def _count_on_host(
        self, is_image: torch.Tensor, padding: torch.Tensor | None, segments: torch.Tensor | None
    ) -> None:
        """Vision tokens per row, padding per row and, for packed rows, tokens and vision
        tokens per sample, copied to the host together (with a count of positions that
        break the packed layout: samples in order from the row's start, padding after)."""
        info = self.micro_batch
        s, b = is_image.shape
        rows = [is_image.sum(0, keepdim=True)]  # [1, b]
        if padding is not None:
            rows.append(padding.sum(0, keepdim=True))
        if segments is not None:  # [s, b] each: sample j's at row j (padding, -1, dropped)
            per_segment = torch.zeros(2 * (s + 1), b, dtype=torch.long, device=segments.device)
            per_segment[: s + 1].scatter_add_(0, segments + 1, torch.ones_like(segments))
            per_segment[s + 1 :].scatter_add_(0, segments + 1, is_image.long())
            rows += [per_segment[1 : s + 1], per_segment[s + 2 :], _misplaced(segments)]
        host = torch.cat([row.long() for row in rows]).cpu()
        info.vision_per_sample = host[0]
        info.padding_per_sample = host[1] if padding is not None else None
        info.tokens_per_segment = info.vision_per_segment = None
        if segments is not None:
            if int(host[-1].sum()):
                raise ValueError("packed rows must hold their samples in order from the row's "
                                 "start and padding (segment -1) after them")
            tokens, vision = host[-1 - 2 * s : -1 - s], host[-1 - s : -1]
            samples = max(1, int((tokens.sum(1) > 0).sum()))  # samples 0..n-1 of some row
            info.tokens_per_segment, info.vision_per_segment = tokens[:samples], vision[:samples]

    def mod_layers(self) -> list[MoDTransformerLayer]:
        return [m for m in self.language_model.decoder.layers if isinstance(m, MoDTransformerLayer)]

    def routers(self) -> list[TopKRouterWithStats]:
        return [m for m in self.language_model.modules() if isinstance(m, TopKRouterWithStats)]

    def parts(self) -> dict[str, torch.nn.Module]:
        """The freezable parts of this pipeline stage, by the names `train.trainable` uses.
        `language` is the whole decoder (this stage's layers); `moe` its MoE layers' experts and routers; `ffn` every decoder layer's
        FFN (a dense layer's MLP, a MoE layer's experts); `router` the MoE routers."""
        layers = self.language_model.decoder.layers
        moe_layers = [layer.mlp for layer in layers if isinstance(layer.mlp, BaseMoELayer)]
        ffns = [
            layer.mlp.experts if isinstance(layer.mlp, BaseMoELayer) else layer.mlp
            for layer in layers
        ]
        absent = torch.nn.ModuleList()  # on a pipeline stage after the first
        return {
            "vision": self.vision_model if self.pre_process else absent,
            "projector": self.vision_projection if self.pre_process else absent,
            "language": self.language_model,
            "moe": torch.nn.ModuleList(moe_layers),
            "ffn": torch.nn.ModuleList(ffns),
            "router": torch.nn.ModuleList(self.routers()),
        }

    def freeze(self, trainable: list[str]) -> None:
        """Parts not named in `trainable` get no gradients (and so no optimizer state).

        MoE-LLaVA's stage 3 is `[ffn, router, projector]`: its `--train_modules` name
        filter (`mlp.gate_proj mlp.up_proj mlp.down_proj wg` for Llama) trains every FFN
        weight, dense or expert, and the gates, and its `initialize_vision_modules` the
        projector. The pre-MLP norm is not an FFN weight there (`post_attention_layernorm`):
        where transformer-engine fuses it into a dense MLP's first linear
        (`linear_fc1.layer_norm_*`), `ffn` leaves it frozen unless `language` trains."""
        self.requires_grad_(False)
        parts = self.parts()
        for name in trainable:
            parts[name].requires_grad_(True)
        if "ffn" in trainable and "language" not in trainable:
            for name, param in parts["ffn"].named_parameters():
                if ".layer_norm_" in name:
                    param.requires_grad_(False)
