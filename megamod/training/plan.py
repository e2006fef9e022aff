"""Plan a run before it is queued: `megamod train CONFIG --dry-run --world-size N`.

Everything a real run checks before its first step, without GPUs, without a process group
of N ranks and without allocating the model (`dry_run`): the config, the tokenizer and
the vocabulary, the data sources and their manifests, the parallel layout of N ranks
(`megamod.parallel.parallel_layout`, `megamod.training.loop.check_batch_split`), the
checkpoint it would start from (MoE layout, and every model tensor's global shape against
the checkpoint's metadata), and the model itself, built on the meta device in a world of
one at TP=1, PP=1. Parameters per rank come from megatron-core's tensor-parallel attributes
on each parameter (`tensor_model_parallel`: split over TP, or over the expert-tensor group
for experts; `allreduce=False`: an expert, split over EP), so no rank of the real layout
has to exist; and from its name, the pipeline stage that builds it (`Stage.holds`): the
vision encoder, projector and token embedding on the first stage, the final norm and
output layer on the last (with tied embeddings and PP > 1, megatron-core's copy of the
word embedding there too), decoder layer i on the stage `Config.pipeline_stage_layers`
gives it.

The memory model (`memory_estimate`, pure) is per GPU of one pipeline stage; the dry run
reports the stage with the largest total:
- weights in `precision.params_dtype`;
- gradients in megatron-core DDP's fp32 buffers (`grad_reduce_in_fp32`), trainable
  parameters only;
- optimizer state: Adam's two fp32 moments, plus fp32 main parameters when parameters are
  16-bit; the distributed optimizer shards it over the data-parallel group (experts: the
  expert-data-parallel group);
- activations: what autograd keeps for backward during one micro-batch's forward at
  `seq_length` on the stage (`activation_bytes`), times the micro-batches megatron-core's
  1F1B schedule keeps in flight there (`Stage.in_flight`: stage s of PP runs PP - 1 - s
  warm-up forwards before its first backward, so it holds min(PP - s, micro-batches) of
  them; PP=1: one). Full recomputation keeps each group's input (groups formed within the
  stage's layers, as megatron-core recomputes per stage), selective recomputation drops
  what its modules would keep, and backward rebuilds one group or module at a time (the
  working set); or, if larger, the logits alive with them when the last stage computes the
  loss: both once, not per micro-batch in flight;
- a fixed reserve for the CUDA context, NCCL's buffers and allocator fragmentation.

`activation_bytes` sums, per decoder layer of the stage, the tensors megatron-core's
modules save: the norms' inputs, each trainable linear's input, the attention's q, k, v
and output (flash or SDPA kernels: no score matrix), the MLP's or experts' intermediates
(experts: the top-k copies of each token, assuming balanced routing), p-MoD's router and
merge inputs with its layers run at their kept tokens (`megamod.mod.schedule.layer_ratios`);
on the first stage the ViT at its patch tokens and the projector when they train, on the
last the fp32 softmax of the vocabulary-parallel cross entropy (a stage's output, once
sent on, is freed: `deallocate_pipeline_outputs`, as in Megatron-LM). A stage's received
input is what its first layer (or recomputed group) keeps. Tensor-parallel parts divide by TP; with sequence
parallelism the rest does too. Two kernel sets differ in what norms and SwiGLU keep:
`LOCAL` (megatron-core's local spec, what megamod runs on CPU: the test measures it
against `torch.autograd.graph.saved_tensors_hooks`) and `TRANSFORMER_ENGINE` (the GPU
path, norms fused into the next linear and megatron-core's fused bias-SwiGLU: each keeps
its input only; read from their sources, not measured: no GPU was at hand), which the dry
run reports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from megamod.config import Config, LanguageConfig, MoEConfig, ParallelConfig, TrainConfig
from megamod.errors import CheckpointError, ConfigError
from megamod.mod.schedule import layer_ratios
from megamod.parallel import ParallelLayout, parallel_layout
from megamod.training.flops import Sample, kept_tokens
from megamod.training.loop import check_batch_split

GIB = 2**30
# CUDA context (~0.5 GiB), NCCL communicators' buffers for a few groups (~1 GiB) and the
# caching allocator's fragmentation: not modelled, reserved.
RESERVE_BYTES = 3 * GIB
_FP32 = 4
# LLaVA's samples hold one image each: the ViT's batch and p-MoD's vision tokens.
IMAGES_PER_SAMPLE = 1
_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


# ---------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class ParameterCounts:
    """The model's parameters (global) and one rank's share of them under a layout (a rank
    of one pipeline stage)."""

    total: int
    trainable: int
    experts: int  # all experts of all MoE layers
    activated: int  # what one token passes through: all but the experts, plus top-k of them
    per_rank: int
    per_rank_trainable: int
    per_rank_trainable_experts: int  # sharded over expert-data-parallel by the dist. optimizer
    experts_per_rank: int  # local experts of each MoE layer (0: dense)


@dataclass(frozen=True)
class ParameterShape:
    """What sharding needs to know of one parameter of a model built at TP=1, EP=1, PP=1."""

    name: str  # as `named_parameters` gives it: says which pipeline stage builds it
    numel: int
    split: bool  # megatron-core's `tensor_model_parallel`: split over (expert-)TP
    expert: bool  # `allreduce=False`: an expert's, split over EP
    trainable: bool


def parameter_shapes(model: Any) -> list[ParameterShape]:
    return [
        ParameterShape(
            name=name,
            numel=param.numel(),
            split=bool(getattr(param, "tensor_model_parallel", False)),
            expert=getattr(param, "allreduce", True) is False,
            trainable=param.requires_grad,
        )
        for name, param in model.named_parameters()
    ]


# Where `megamod.models.llava.LLaVA` builds its parts (parameter names at PP=1).
_FIRST_STAGE_PARTS = ("vision_model.", "vision_projection.", "language_model.embedding.")
_LAST_STAGE_PARTS = ("language_model.decoder.final_layernorm.", "language_model.output_layer.")
_DECODER_LAYER = re.compile(r"language_model\.decoder\.layers\.(\d+)\.")
WORD_EMBEDDING = "language_model.embedding.word_embeddings.weight"


@dataclass(frozen=True)
class Stage:
    """One pipeline stage of the layout: the parts of the model megatron-core builds on it."""

    index: int
    stages: int  # the pipeline's size, PP
    layers: range  # its decoder layers, by global index
    # Tied embeddings at PP > 1: the last stage's copy of the word embedding as the output
    # layer's weight (megatron-core's `shared_embedding`, its gradient all-reduced with
    # the first stage's).
    embedding_copy: bool = False

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.stages - 1

    def holds(self, name: str) -> bool:
        """Whether this stage builds the parameter `name` of the model built at PP=1."""
        layer = _DECODER_LAYER.match(name)
        if layer:
            return int(layer.group(1)) in self.layers
        if name.startswith(_FIRST_STAGE_PARTS):
            return self.first or (self.embedding_copy and name == WORD_EMBEDDING)
        if name.startswith(_LAST_STAGE_PARTS):
            return self.last
        raise ValueError(f"no pipeline stage is known for the parameter {name}")

    def in_flight(self, micro_batches: int) -> int:
        """Micro-batches whose activations this stage keeps at once under megatron-core's
        1F1B schedule (`forward_backward_pipelining_without_interleaving`): its
        PP - 1 - index warm-up forwards and the first steady-state one, at most all of
        `micro_batches` (per step and DP rank)."""
        return min(self.stages - self.index, micro_batches)


def pipeline_stages(config: Config) -> list[Stage]:
    """`config`'s pipeline stages (ConfigError when its layers do not split over them)."""
    sizes = config.pipeline_stage_layers()
    starts = [0, *itertools.accumulate(sizes)]
    tied = not config.model.language.untie_embeddings_and_output_weights
    return [
        Stage(i, len(sizes), range(starts[i], starts[i + 1]),
              embedding_copy=tied and len(sizes) > 1 and i == len(sizes) - 1)
        for i in range(len(sizes))
    ]


def whole_model(config: Config) -> Stage:
    """The one stage of PP=1: every part of the model."""
    return Stage(0, 1, range(config.model.language.num_layers))


def micro_batches_per_step(config: Config, dp: int) -> int:
    """Micro-batches each data-parallel rank runs per step (gradient accumulation)."""
    return config.train.global_batch_size // (config.train.micro_batch_size * dp)


def count_parameters(
    shapes: list[ParameterShape], layout: ParallelLayout, moe: MoEConfig,
    stage: Optional[Stage] = None,
) -> ParameterCounts:
    """Count a model's parameters as `layout` shards them: a parameter megatron-core marks
    `tensor_model_parallel` is split over TP (an expert's over the expert-tensor-parallel
    group), an expert over EP; the others are replicated. Per rank: a rank of `stage`
    (default: all of the model, PP=1); the global counts are the whole model's."""
    total = trainable = experts = per_rank = per_rank_trainable = per_rank_experts = 0
    for shape in shapes:
        if shape.expert:
            share = shape.numel // layout.ep // (layout.etp if shape.split else 1)
        else:
            share = shape.numel // (layout.tp if shape.split else 1)
        if stage is not None and not stage.holds(shape.name):
            share = 0
        total += shape.numel
        per_rank += share
        experts += shape.numel if shape.expert else 0
        if shape.trainable:
            trainable += shape.numel
            per_rank_trainable += share
            per_rank_experts += share if shape.expert else 0
    # Experts are equal in size: the top-k share is a whole number.
    active = experts * moe.router_topk // moe.num_experts if moe.num_experts else 0
    return ParameterCounts(
        total=total,
        trainable=trainable,
        experts=experts,
        activated=total - experts + active,
        per_rank=per_rank,
        per_rank_trainable=per_rank_trainable,
        per_rank_trainable_experts=per_rank_experts,
        experts_per_rank=(moe.num_experts or 0) // layout.ep,
    )


# ---------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class Kernels:
    """What a norm and a SwiGLU keep for backward, by implementation."""

    name: str
    # Norms fused into the following linear (transformer-engine's LayerNormLinear; a MoE
    # layer's separate TENorm alike): the norm keeps its input in the activation dtype and
    # its rstd. Unfused torch RMSNorm in 16 bits computes in fp32: it keeps an fp32 copy
    # of its input and, when its weight trains, the fp32 normalised output.
    fused_norms: bool
    # megatron-core's fused bias-SwiGLU keeps its input only; the unfused one also the
    # SiLU output and the offset copy of the linear half (and, in experts, the
    # probability-weighted product).
    fused_swiglu: bool


LOCAL = Kernels("local", fused_norms=False, fused_swiglu=False)
TRANSFORMER_ENGINE = Kernels("transformer-engine", fused_norms=True, fused_swiglu=True)


@dataclass(frozen=True)
class Trains:
    """Which parameters train (`train.trainable`, as `LLaVA.parts` names them)."""

    vision: bool
    projector: bool
    language: bool  # the decoder: attention, norms, embeddings, output layer, MoD routers
    mlp: bool  # dense FFNs
    experts: bool
    router: bool

    @staticmethod
    def of(trainable: list[str]) -> Trains:
        language = "language" in trainable
        return Trains(
            vision="vision" in trainable,
            projector="projector" in trainable,
            language=language,
            mlp=language or "ffn" in trainable,
            experts=language or "ffn" in trainable or "moe" in trainable,
            router=language or "router" in trainable or "moe" in trainable,
        )


@dataclass(frozen=True)
class Recompute:
    """The decoder's activation recomputation (`train.recompute_*`)."""

    granularity: Optional[str] = None
    method: Optional[str] = None
    num_layers: Optional[int] = None
    modules: frozenset[str] = frozenset()

    @staticmethod
    def of(train: TrainConfig) -> Recompute:
        modules = train.recompute_modules
        if train.recompute_granularity == "selective" and modules is None:
            modules = ["core_attn"]  # megatron-core's default
        return Recompute(train.recompute_granularity, train.recompute_method,
                         train.recompute_num_layers, frozenset(modules or ()))

    def selects(self, module: str) -> bool:
        return self.granularity == "selective" and module in self.modules

    def describe(self) -> str:
        if self.granularity is None:
            return "none"
        if self.granularity == "full":
            return f"full, {self.method}, {self.num_layers} layer(s)"
        return "selective: " + ", ".join(sorted(self.modules))


@dataclass
class Activations:
    """Bytes of one micro-batch's activations on one rank of a pipeline stage, and how
    many micro-batches the stage keeps at once."""

    vision: float  # ViT and projector (first stage; only when they, or the ViT, train)
    # What the stage's decoder layers keep through the forward (checkpoints, under full
    # recompute).
    decoder: float
    loss: float  # last stage: final norm, output layer input, the cross entropy's fp32 softmax
    embedding: float  # first stage: token ids and the image mask
    recompute_working_set: float  # one recomputed group or module rebuilt in backward
    logits_transient: float  # last stage: the output layer's logits, alive with all of the above
    layers: list[float] = field(default_factory=list)  # the stage's decoder layers, not recomputed
    in_flight: int = 1  # micro-batches kept at once (`Stage.in_flight`)

    @property
    def saved(self) -> float:
        """What one micro-batch's forward keeps for backward (at PP=1, what
        saved_tensors_hooks would see)."""
        return self.vision + self.decoder + self.loss + self.embedding

    @property
    def peak(self) -> float:
        # One group or module is rebuilt, or one micro-batch's logits alive, at a time.
        return self.in_flight * self.saved + max(self.recompute_working_set, self.logits_transient)


@dataclass(frozen=True)
class _Shapes:
    """One rank's view of a micro-batch in the model (sizes in elements, bytes per
    activation element in `act`)."""

    act: int
    tp: int
    sp: bool
    batch: int
    seq: int
    language: LanguageConfig
    moe: MoEConfig
    etp: int
    kernels: Kernels
    trains: Trains
    recompute: Recompute

    @property
    def kv(self) -> int:
        heads = self.language.num_attention_heads
        return (self.language.num_query_groups or heads) * self.language.hidden_size // heads

    def seq_shard(self, tokens: float) -> float:
        """Tokens of a [tokens, h] tensor on this rank: split over TP under SP."""
        return tokens / self.tp if self.sp else tokens

    def norm(self, tokens: float, width: int, trains: bool) -> float:
        """An RMSNorm's saved tensors for `tokens` rows of `width`: input (or its fp32
        copy), the fp32 normalised output when unfused with a trainable weight, rstd."""
        if self.kernels.fused_norms:
            return tokens * (width * self.act + _FP32)
        return tokens * (width * (_FP32 + _FP32 * trains) + _FP32)


def _attention(g: _Shapes, tokens: float, rope_rows: float) -> float:
    """Norm + self-attention over `tokens` (sequence x batch) tokens; `rope_rows`: rows of
    the RoPE cos/sin tables it multiplies by (the sequence, or MoD's per-token rows)."""
    language, tp, act = g.language, g.tp, g.act
    h, heads = language.hidden_size, language.num_attention_heads
    local = g.seq_shard(tokens)
    core_recomputed = g.recompute.selects("core_attn")
    saved = g.norm(local, h, g.trains.language)
    saved += act * local * h * g.trains.language  # the QKV linear's input
    saved += act * tokens * (h + 2 * g.kv) / tp  # QKV output (V is a view of it)
    saved += act * tokens * (h + g.kv) / tp  # Q and K after RoPE
    saved += 4 * act * rope_rows * h // heads  # cos and sin, twice each
    if not core_recomputed:
        saved += _FP32 * tokens * heads / tp  # log-sum-exp of the flash / SDPA kernel
    if g.trains.language or not core_recomputed:
        saved += act * tokens * h / tp  # attention output, the projection's input
    return saved


def _mlp(g: _Shapes, tokens: float) -> float:
    """Norm + dense SwiGLU (or GELU) MLP over `tokens` tokens."""
    language, tp, act = g.language, g.tp, g.act
    h, ffn = language.hidden_size, language.ffn_hidden_size
    local = g.seq_shard(tokens)
    norm = g.norm(local, h, g.trains.language)
    if g.recompute.selects("mlp"):
        # The MLP keeps its input alone; with transformer-engine the norm is inside it.
        return act * local * h + (0.0 if g.kernels.fused_norms else norm)
    saved = norm + act * local * h * g.trains.mlp  # fc1's input
    if language.swiglu:
        saved += act * tokens * 2 * ffn / tp  # fc1's output, the activation's input
        saved += 0.0 if g.kernels.fused_swiglu else 2 * act * tokens * ffn / tp
    else:
        saved += act * tokens * ffn / tp
    return saved + act * tokens * ffn / tp * g.trains.mlp  # fc2's input


def _moe(g: _Shapes, tokens: float) -> float:
    """Norm + MoE layer over `tokens` tokens: router, dispatch of top-k copies of each
    token (balanced over the experts; padded to capacity when asked), experts."""
    moe, act = g.moe, g.act
    h = g.language.hidden_size
    ffn = (moe.ffn_hidden_size or g.language.ffn_hidden_size) / g.etp
    local = g.seq_shard(tokens)
    saved = g.norm(local, h, g.trains.language)
    if g.recompute.selects("moe"):
        return saved + act * local * h  # the layer's input alone
    padding = moe.capacity_factor if moe.pad_expert_input_to_capacity else 1.0
    rows = moe.router_topk * local * g.etp * padding  # expert input rows on this rank
    experts = g.trains.experts
    if not g.recompute.selects("layernorm"):  # (transformer-engine's separate TENorm)
        saved += act * local * h  # the router's input
    # Router and dispatcher bookkeeping: probabilities, scores, top-k indices, masks; per
    # expert row its source index and probability.
    saved += local * (20 * moe.router_topk + 9 * moe.num_experts) + 12 * rows
    saved += act * rows * h * experts  # permuted tokens, fc1's input
    saved += act * rows * 2 * ffn  # fc1's output
    if not g.kernels.fused_swiglu:
        saved += 3 * act * rows * ffn
    if not g.recompute.selects("moe_act"):
        saved += act * rows * ffn * experts  # fc2's input
    return saved


def _mod(g: _Shapes, kept_tokens: float, is_moe: bool) -> float:
    """A p-MoD layer: the router scores the whole sequence (its input, gathered over TP
    under SP, kept in the model's dtype: `mod.router.Fp32Scores`; without SP it is the layer
    input the merge keeps anyway), the layer runs on the kept tokens, the merge keeps the
    layer input."""
    h, act = g.language.hidden_size, g.act
    tokens = g.batch * g.seq
    local, kept_local = g.seq_shard(tokens), g.seq_shard(kept_tokens)
    gathered = act * tokens * h if g.sp and g.tp > 1 else 0.0
    saved = gathered * g.trains.language + _FP32 * tokens  # router input, weights
    saved += act * local * (h + 1) + 9 * local  # merge: x and weights, indices, mask
    saved += 17 * kept_local + act * kept_local * (h + 1)  # kept rows: indices, mask, w * f
    saved += _attention(g, kept_tokens, kept_tokens)
    return saved + (_moe(g, kept_tokens) if is_moe else _mlp(g, kept_tokens))


def _layers(g: _Shapes, config: Config) -> list[float]:
    language = config.model.language
    pattern = config.moe.layer_pattern(language.num_layers)
    ratios = layer_ratios(config.mod, language.num_layers)
    kept = kept_tokens(config, Sample(IMAGES_PER_SAMPLE, g.seq))
    multiple = config.mod.kept_length_multiple
    tokens = g.batch * g.seq
    layers = []
    for is_moe, ratio, kept_per_sample in zip(pattern, ratios, kept):
        if ratio is not None:
            padded = math.ceil(kept_per_sample / multiple) * multiple
            layers.append(_mod(g, g.batch * padded, bool(is_moe)))
        else:
            ffn = _moe(g, tokens) if is_moe else _mlp(g, tokens)
            layers.append(_attention(g, tokens, g.seq) + ffn)
    return layers


def _vision(g: _Shapes, config: Config, images: int) -> float:
    """The ViT (built layers) and projector on `images` images, when anything in them
    trains (nothing upstream of them does)."""
    vision, act, tp = config.model.vision, g.act, g.tp
    trains = g.trains
    saved = 0.0
    hv, fv, heads = vision.hidden_size, vision.ffn_hidden_size, vision.num_attention_heads
    if trains.vision:
        tokens = images * (vision.num_patches + 1)  # CLS
        layernorm = act * tokens * (hv + 2)  # input, mean, rstd
        saved += act * images * 3 * vision.image_size**2 + layernorm  # conv input, ln_pre
        layer = 2 * layernorm + 2 * act * tokens * hv  # norms, QKV and fc1 inputs
        layer += act * tokens * 4 * hv / tp  # QKV output (Q, K, V are views), output
        layer += _FP32 * tokens * heads / tp + 2 * act * tokens * fv / tp  # lse, GELU, fc2
        saved += vision.num_built_layers * layer
    if trains.vision or trains.projector:
        tokens, hl = images * vision.num_patches, config.model.language.hidden_size
        saved += act * tokens * hv * trains.projector  # fc1's input
        saved += act * tokens * hl / tp * (1 + trains.projector)  # GELU input, fc2's input
    return saved


def _full_recompute(g: _Shapes, layers: list[float]) -> tuple[float, float]:
    """(what the decoder keeps, the working set of one recomputed group) under full
    recomputation of a stage's `layers`, grouped within them as megatron-core does: each
    checkpointed group keeps its input (and the shared RoPE table)."""
    count = g.recompute.num_layers
    checkpoint = g.act * g.seq_shard(g.batch * g.seq) * g.language.hidden_size
    rope = _FP32 * g.seq * g.language.hidden_size // g.language.num_attention_heads
    if g.recompute.method == "uniform":
        groups = [layers[i : i + count] for i in range(0, len(layers), count)]
        return len(groups) * checkpoint + rope, max(sum(group) for group in groups)
    # block: the first `count` layers one by one, the others keep everything.
    return len(layers[:count]) * checkpoint + rope + sum(layers[count:]), max(layers[:count])


def activation_bytes(
    config: Config, vocab_rows: int, kernels: Kernels = TRANSFORMER_ENGINE,
    stage: Optional[Stage] = None, micro_batches: int = 1,
) -> Activations:
    """One micro-batch of `train.micro_batch_size` samples at `seq_length`, each with
    IMAGES_PER_SAMPLE images, on one rank of `stage` (default: the whole model, PP=1) of
    `config.parallel`'s layout; the stage keeps `stage.in_flight(micro_batches)` of them,
    `micro_batches` being those of a step on one DP rank."""
    parallel, language = config.parallel, config.model.language
    stage = stage or whole_model(config)
    tp = parallel.tensor_model_parallel_size
    g = _Shapes(
        act=_DTYPE_BYTES[config.precision.params_dtype],
        tp=tp,
        sp=parallel.sequence_parallel,
        batch=config.train.micro_batch_size,
        seq=language.seq_length,
        language=language,
        moe=config.moe,
        etp=parallel.expert_tensor_parallel_size or tp,
        kernels=kernels,
        trains=Trains.of(config.train.trainable),
        recompute=Recompute.of(config.train),
    )
    tokens = g.batch * g.seq
    local = g.seq_shard(tokens)
    on_stage = slice(stage.layers.start, stage.layers.stop)
    layers = _layers(dataclasses.replace(g, recompute=Recompute()), config)[on_stage]
    if g.recompute.granularity == "full":
        decoder, working_set = _full_recompute(g, layers)
    else:  # selective: one recomputed module rebuilt at a time
        kept = _layers(g, config)[on_stage]
        decoder = sum(kept)
        working_set = max(full - part for full, part in zip(layers, kept))
    loss = logits = 0.0
    if stage.last:
        loss = g.norm(local, language.hidden_size, g.trains.language)
        loss += g.act * local * language.hidden_size * g.trains.language  # output layer input
        loss += tokens * (_FP32 * vocab_rows / tp + 9)  # fp32 softmax, target mask and indices
        logits = g.act * tokens * vocab_rows / tp
    return Activations(
        vision=_vision(g, config, g.batch * IMAGES_PER_SAMPLE) if stage.first else 0.0,
        decoder=decoder,
        loss=loss,
        embedding=tokens * 9 if stage.first else 0.0,  # int64 token ids, the image mask
        recompute_working_set=working_set,
        logits_transient=logits,
        layers=layers,
        in_flight=stage.in_flight(micro_batches),
    )


# ---------------------------------------------------------------------------- memory


@dataclass
class MemoryEstimate:
    """Bytes per GPU."""

    weights: float
    gradients: float
    optimizer: float  # as configured (distributed or not)
    optimizer_replicated: float  # without the distributed optimizer
    optimizer_distributed: float  # with it
    activations: Activations
    reserve: float = RESERVE_BYTES

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations.peak + self.reserve


def optimizer_bytes(
    counts: ParameterCounts, layout: ParallelLayout, params_dtype: str, distributed: bool
) -> float:
    """Adam's two fp32 moments per trainable parameter, plus an fp32 main copy when the
    parameters are 16-bit; the distributed optimizer shards dense parameters' state over
    the data-parallel group and experts' over the expert-data-parallel group."""
    per_param = 2 * _FP32 + (_FP32 if params_dtype != "fp32" else 0)
    experts = counts.per_rank_trainable_experts
    dense = counts.per_rank_trainable - experts
    if distributed:
        return per_param * (dense / layout.dp + experts / layout.expert_dp)
    return per_param * (dense + experts)


def memory_estimate(
    config: Config, counts: ParameterCounts, layout: ParallelLayout, vocab_rows: int,
    kernels: Kernels = TRANSFORMER_ENGINE, stage: Optional[Stage] = None,
) -> MemoryEstimate:
    """Per-GPU memory of `config` on `layout` on a GPU of `stage` (default: the whole
    model, PP=1), from that stage's per-rank parameter counts."""
    dtype = config.precision.params_dtype
    replicated = optimizer_bytes(counts, layout, dtype, distributed=False)
    distributed = optimizer_bytes(counts, layout, dtype, distributed=True)
    return MemoryEstimate(
        weights=counts.per_rank * _DTYPE_BYTES[dtype],
        # megatron-core DDP's contiguous buffers, fp32 (grad_reduce_in_fp32), full size on
        # every rank with or without the distributed optimizer.
        gradients=counts.per_rank_trainable * _FP32,
        optimizer=distributed if config.parallel.use_distributed_optimizer else replicated,
        optimizer_replicated=replicated,
        optimizer_distributed=distributed,
        activations=activation_bytes(config, vocab_rows, kernels, stage,
                                     micro_batches_per_step(config, layout.dp)),
    )


@dataclass
class StageEstimate:
    """One pipeline stage's parameters and memory per GPU."""

    stage: Stage
    counts: ParameterCounts
    memory: MemoryEstimate


def stage_estimates(
    config: Config, shapes: list[ParameterShape], layout: ParallelLayout, vocab_rows: int
) -> list[StageEstimate]:
    """Each pipeline stage of `config` on `layout` (one at PP=1): what a GPU of it holds."""
    estimates = []
    for stage in pipeline_stages(config):
        counts = count_parameters(shapes, layout, config.moe, stage)
        estimates.append(StageEstimate(
            stage, counts, memory_estimate(config, counts, layout, vocab_rows, stage=stage)))
    return estimates


def largest(estimates: list[StageEstimate]) -> StageEstimate:
    """The stage whose GPUs need the most memory: the one that must fit."""
    return max(estimates, key=lambda estimate: estimate.memory.total)


def remedies(
    config: Config, shapes: list[ParameterShape], world_size: int, vocab_rows: int
) -> list[tuple[str, float]]:
    """Single changes that lower the estimate (its largest stage), each with its new total
    (bytes), lowest first. Those the world size, the heads, the layers or the batch cannot
    take are left out."""
    parallel, train, experts = config.parallel, config.train, config.moe.num_experts
    tp, ep = parallel.tensor_model_parallel_size, parallel.expert_model_parallel_size
    pp = parallel.pipeline_model_parallel_size
    full = {"recompute_granularity": "full", "recompute_method": "uniform",
            "recompute_num_layers": 1, "recompute_modules": None}
    changes = [
        (f"raise parallel.tensor_model_parallel_size to {tp * 2}", "parallel",
         {"tensor_model_parallel_size": tp * 2, "sequence_parallel": True}),
        ("set parallel.sequence_parallel=true", "parallel", {"sequence_parallel": True}),
        (f"raise parallel.pipeline_model_parallel_size to {pp * 2}", "parallel",
         {"pipeline_model_parallel_size": pp * 2}),
        ("set parallel.use_distributed_optimizer=true", "parallel",
         {"use_distributed_optimizer": True}),
        (f"raise parallel.expert_model_parallel_size to {ep * 2}", "parallel",
         {"expert_model_parallel_size": ep * 2}),
        ("set train.recompute_granularity=selective train.recompute_modules=[moe]", "train",
         {"recompute_granularity": "selective", "recompute_modules": ["moe"]}),
        ("set train.recompute_granularity=full train.recompute_method=uniform "
         "train.recompute_num_layers=1", "train", full),
        (f"lower train.micro_batch_size to {train.micro_batch_size // 2}", "train",
         {"micro_batch_size": train.micro_batch_size // 2}),
    ]
    found = []
    for text, section, fields in changes:
        current = getattr(config, section)
        if all(getattr(current, key) == value for key, value in fields.items()):
            continue  # already so
        if fields.get("recompute_modules") == ["moe"] and (not experts or train.recompute_granularity):
            continue  # for a MoE model that recomputes nothing yet
        try:
            changed = dataclasses.replace(
                config, **{section: dataclasses.replace(current, **fields)}
            )
            layout = parallel_layout(changed.parallel, world_size)
            check_batch_split(changed, layout.dp)
        except ConfigError:
            continue  # not a layout, pipeline split, model or batch this job can take
        estimates = stage_estimates(changed, shapes, layout, vocab_rows)
        found.append((text, largest(estimates).memory.total))
    return sorted(found, key=lambda item: item[1])


# ---------------------------------------------------------------------------- the dry run


@dataclass
class Plan:
    """What `dry_run` found: a run of `config` on `layout`, and its memory per GPU of each
    pipeline stage; `counts` and `memory` are the largest stage's."""

    config: Config
    layout: ParallelLayout
    tokenizer_size: int
    vocab_rows: int
    data: list[dict[str, Any]]
    checkpoint: Optional[dict[str, Any]]
    stages: list[StageEstimate]
    budget: float  # bytes per GPU
    remedies: list[tuple[str, float]]

    @property
    def peak(self) -> StageEstimate:
        return largest(self.stages)

    @property
    def counts(self) -> ParameterCounts:
        return self.peak.counts

    @property
    def memory(self) -> MemoryEstimate:
        return self.peak.memory

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.budget


def check_data(config: Config) -> list[dict[str, Any]]:
    """Open every shard source as the loader does (`open_source`: the manifest, each
    shard's presence and size); "tiny" is built by the run itself."""
    from megamod.data.reader import open_source

    data = config.data
    sources = [(source.shards, f"data.mixture[{i}].shards")
               for i, source in enumerate(data.mixture)]
    found = []
    for spec, key in sources or [(data.train_shards, "data.train_shards")]:
        if spec == "tiny":
            found.append({"key": key, "shards": spec, "files": None, "samples": None})
            continue
        source = open_source(spec, key)
        found.append({"key": key, "shards": spec, "files": len(source.shards),
                      "samples": len(source)})
    return found


def check_checkpoint_tensors(model: Any, load_dir: str | Path) -> int:
    """Every tensor of `model`'s sharded state dict against the latest checkpoint of
    `load_dir` (metadata only): present (but p-MoD's routers, which a dense checkpoint
    lacks) and of the same global shape. Returns the number of tensors compared."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from megamod.training import checkpoint

    ckpt_dir = checkpoint.iteration_dir(load_dir, checkpoint.read_latest_iteration(load_dir))
    checkpoint.check_intact(ckpt_dir)
    saved = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))
    state = checkpoint.model_sharded_state_dict(model)
    apply_factories(state)
    shapes = {
        value.key: tuple(value.global_shape)
        for value in nested_values(state) if isinstance(value, ShardedTensor)
    }
    problems = [f"{key} is missing" for key in shapes
                if key not in saved and ".mod_router." not in key]
    problems += [
        f"{key} is {tuple(saved[key].global_shape)} there but {shape} here"
        for key, shape in shapes.items()
        if key in saved and tuple(saved[key].global_shape) != shape
    ]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(
            f"checkpoint {ckpt_dir} does not fit this model: {'; '.join(problems[:3])}{more}. "
            f"If model.* changed, use the settings it was saved with (`megamod inspect "
            f"{load_dir}` lists them)"
        )
    return len(shapes)


@contextlib.contextmanager
def meta_model(config: Config, tokenizer: Any) -> Iterator[Any]:
    """`config`'s model on the meta device (no memory), built as a world of one at TP=1,
    PP=1 (the parameters' TP/EP attributes say how the real layout splits them, their
    names which pipeline stage builds them: `Stage.holds`). Recompute
    modules only transformer-engine runs (moe_act, layernorm) and fp8 are left out of the
    build: they change no parameter, and this machine need not have a GPU."""
    import torch

    from megamod.models.build import build_model
    from megamod.parallel import world_of_one

    train = config.train
    modules = [m for m in train.recompute_modules or [] if m not in ("moe_act", "layernorm")]
    if train.recompute_modules and not modules:
        train = dataclasses.replace(train, recompute_granularity=None, recompute_modules=None)
    elif train.recompute_modules:
        train = dataclasses.replace(train, recompute_modules=modules)
    one = dataclasses.replace(
        config,
        parallel=ParallelConfig(),
        train=train,
        precision=dataclasses.replace(config.precision, fp8=None),
    )
    with world_of_one(one.parallel, one.train.seed, "train --dry-run"):
        with torch.device("meta"):
            yield build_model(one, tokenizer)


def dry_run(config: Config, world_size: int, gpu_memory_gib: float) -> Plan:
    """Check `config` for a run on `world_size` GPUs as `megamod train` would before its
    first step (see the module docstring), and estimate its memory per GPU. Raises
    ConfigError, DataError or CheckpointError (exit 2) on what the real run would refuse;
    whether the estimate fits `gpu_memory_gib` is the caller's to judge (`Plan.fits`)."""
    from megatron.core import dist_checkpointing

    from megamod.data.tokenizer import load_tokenizer
    from megamod.models.build import vocab_size, with_vocab_size
    from megamod.training import checkpoint

    layout = parallel_layout(config.parallel, world_size)
    check_batch_split(config, layout.dp)
    tokenizer = load_tokenizer(config.data.tokenizer)
    data = check_data(config)
    load_dir, finetune = checkpoint.start_from(config.checkpoint)
    found = None
    if load_dir is not None:
        config = checkpoint.config_for_load(load_dir, config, tokenizer.vocab_size, finetune)
        iteration = checkpoint.read_latest_iteration(load_dir)
        common = dist_checkpointing.load_common_state_dict(
            str(checkpoint.iteration_dir(load_dir, iteration))
        )
        if not finetune and "scheduler" not in common:
            raise CheckpointError(
                f"checkpoint {load_dir} holds model weights only (no optimizer state to "
                f"resume): load it with checkpoint.finetune=true"
            )
        found = {"load": str(load_dir), "iteration": iteration, "finetune": finetune}
    rows = vocab_size(config, tokenizer.vocab_size)
    config = with_vocab_size(config, rows)
    with meta_model(config, tokenizer) as model:
        shapes = parameter_shapes(model)
        if load_dir is not None:
            found["tensors"] = check_checkpoint_tensors(model, load_dir)
    stages = stage_estimates(config, shapes, layout, rows)
    budget = gpu_memory_gib * GIB
    fits = largest(stages).memory.total <= budget
    fixes = [] if fits else remedies(config, shapes, world_size, rows)
    return Plan(config, layout, tokenizer.vocab_size, rows, data, found, stages, budget, fixes)


def check_fits(plan: Plan) -> None:
    """ConfigError (exit 2) naming what to change when the estimate exceeds the budget."""
    if plan.fits:
        return
    enough = [(text, total) for text, total in plan.remedies if total <= plan.budget]
    options = enough or plan.remedies
    advice = "; or ".join(f"{text} (-> {total / GIB:.1f} GiB)" for text, total in options)
    lead = "" if enough else " (none alone is enough: combine them)"
    where = f" (pipeline stage {plan.peak.stage.index})" if plan.layout.pp > 1 else ""
    raise ConfigError(
        f"the estimate, {plan.memory.total / GIB:.1f} GiB per GPU{where}, exceeds --gpu-memory "
        f"{plan.budget / GIB:g} GiB: {advice}{lead}"
    )


# ---------------------------------------------------------------------------- output


def plan_json(plan: Plan) -> dict[str, Any]:
    memory, activations = plan.memory, plan.memory.activations
    micro_batches = micro_batches_per_step(plan.config, plan.layout.dp)
    return {
        "world_size": plan.layout.world_size,
        "layout": dataclasses.asdict(plan.layout),
        "sequence_parallel": plan.config.parallel.sequence_parallel,
        "tokenizer_size": plan.tokenizer_size,
        "vocab_rows": plan.vocab_rows,
        "data": plan.data,
        "checkpoint": plan.checkpoint,
        "parameters": dataclasses.asdict(plan.counts),
        "stage": plan.peak.stage.index,  # the largest, which the figures below are of
        "stages": [
            {
                "stage": estimate.stage.index,
                "first_layer": estimate.stage.layers.start,
                "decoder_layers": len(estimate.stage.layers),
                "micro_batches_in_flight": estimate.stage.in_flight(micro_batches),
                "parameters_per_gpu": estimate.counts.per_rank,
                "activations_bytes": estimate.memory.activations.peak,
                "total_bytes": estimate.memory.total,
            }
            for estimate in plan.stages
        ],
        "memory_bytes": {
            "weights": memory.weights,
            "gradients": memory.gradients,
            "optimizer": memory.optimizer,
            "optimizer_replicated": memory.optimizer_replicated,
            "optimizer_distributed": memory.optimizer_distributed,
            "activations": activations.peak,
            "activations_micro_batches_in_flight": activations.in_flight,
            "activations_vision": activations.vision,
            "activations_decoder": activations.decoder,
            "activations_loss": activations.loss + activations.embedding,
            "recompute_working_set": activations.recompute_working_set,
            "logits_transient": activations.logits_transient,
            "reserve": memory.reserve,
            "total": memory.total,
        },
        "kernels": TRANSFORMER_ENGINE.name,
        "recompute": Recompute.of(plan.config.train).describe(),
        "gpu_memory_bytes": plan.budget,
        "fits": plan.fits,
        "remedies": [{"change": text, "total_bytes": total} for text, total in plan.remedies],
    }


def _stage_line(estimate: StageEstimate, micro_batches: int, largest_stage: int) -> str:
    stage = estimate.stage
    parts = ["vision encoder, projector, embedding"] if stage.first else []
    parts += [f"decoder layers {stage.layers.start}-{stage.layers.stop - 1}"]
    parts += ["final norm, output layer, loss"] if stage.last else []
    parts += ["word embedding copy"] if stage.embedding_copy else []
    mark = "  <- the largest" if stage.index == largest_stage else ""
    in_flight = stage.in_flight(micro_batches)
    return (f"stage {stage.index:<6}{'; '.join(parts)}: {estimate.counts.per_rank:,} parameters "
            f"per GPU, {in_flight} micro-batch{'es' if in_flight > 1 else ''} in flight, "
            f"{estimate.memory.total / GIB:.2f} GiB{mark}")


def format_plan(plan: Plan) -> str:
    config, layout, counts, memory = plan.config, plan.layout, plan.counts, plan.memory
    parallel, train, moe = config.parallel, config.train, config.moe
    activations = memory.activations
    steps = micro_batches_per_step(config, layout.dp)
    sp = ", sequence parallel" if parallel.sequence_parallel else ""
    lines = [f"layout      {layout.world_size} GPUs = TP {layout.tp} x PP {layout.pp} x DP "
             f"{layout.dp}{sp}"]
    if moe.num_experts:
        lines.append(f"experts     EP {layout.ep} x expert-TP {layout.etp} x expert-DP "
                     f"{layout.expert_dp}: {counts.experts_per_rank} of {moe.num_experts} "
                     f"experts per GPU in each MoE layer, top-{moe.router_topk}")
    lines.append(f"batch       {train.global_batch_size} = micro-batch {train.micro_batch_size} x "
                 f"DP {layout.dp} x {steps} accumulation steps, "
                 f"{config.model.language.seq_length} tokens per sample")
    if layout.pp > 1:
        lines += [_stage_line(estimate, steps, plan.peak.stage.index) for estimate in plan.stages]
    lines.append(f"vocabulary  {plan.tokenizer_size} tokens ({config.data.tokenizer}), "
                 f"{plan.vocab_rows} embedding rows")
    for source in plan.data:
        what = ("built by the run" if source["files"] is None
                else f"{source['files']} shard(s), {source['samples']} samples")
        lines.append(f"data        {source['key']}={source['shards']}: {what}")
    ckpt = plan.checkpoint
    lines.append("checkpoint  " + (
        "none: starts from scratch" if ckpt is None else
        f"{ckpt['load']} iteration {ckpt['iteration']} "
        f"({'weights only' if ckpt['finetune'] else 'resume'}): {ckpt['tensors']} tensors match"))
    per_gpu = "per GPU" if layout.pp == 1 else f"stage {plan.peak.stage.index}"
    lines += ["", f"{'parameters':<30}{'model':>16}{per_gpu:>16}",
              f"{'  all':<30}{counts.total:>16,}{counts.per_rank:>16,}",
              f"{'  trainable':<30}{counts.trainable:>16,}{counts.per_rank_trainable:>16,}"]
    if moe.num_experts:
        lines.append(f"{'  activated per token':<30}{counts.activated:>16,}")

    distributed = parallel.use_distributed_optimizer
    other = memory.optimizer_replicated if distributed else memory.optimizer_distributed
    extra = max(activations.recompute_working_set, activations.logits_transient)
    extra_kind = ("a recomputed part rebuilt"
                  if activations.recompute_working_set > activations.logits_transient
                  else "the logits")
    in_flight = activations.in_flight
    flight, each = (f" x {in_flight} in flight", "each") if in_flight > 1 else ("", "")
    rows = [
        (f"weights ({config.precision.params_dtype})", memory.weights, ""),
        ("gradients (fp32 DDP buffers)", memory.gradients, ""),
        (f"optimizer (Adam, fp32{'' if distributed else ', not'} distributed)", memory.optimizer,
         f"({'not ' if distributed else ''}distributed: {other / GIB:.2f})"),
        (f"activations (micro-batch {train.micro_batch_size}{flight})", activations.peak, ""),
        ("  vision encoder and projector", activations.vision, each),
        (f"  decoder (recompute: {Recompute.of(train).describe()})", activations.decoder, each),
        ("  loss and embeddings", activations.loss + activations.embedding, each),
        (f"  at the peak, {extra_kind}", extra, ""),
        ("reserve (CUDA context, NCCL, fragmentation)", memory.reserve, ""),
        ("total", memory.total,
         f"of {plan.budget / GIB:g}: " + ("fits" if plan.fits else "DOES NOT FIT")),
    ]
    where = "" if layout.pp == 1 else f", stage {plan.peak.stage.index}"
    header = f"memory per GPU ({TRANSFORMER_ENGINE.name} kernels{where})"
    lines += ["", f"{header:<52}{'GiB':>8}"]
    lines += [f"  {label:<50}{value / GIB:>8.2f}   {note}".rstrip() for label, value, note in rows]
    return "\n".join(lines)
