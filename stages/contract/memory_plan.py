"""How much device memory a train step will take, from config.json and the params alone (docs/memory.md).

A sum of terms, each a count of bytes of one kind of tensor the step holds at its peak:

- the frozen base: every decoder linear in NF4 (4 bits a weight, one 8-bit absmax per block, one fp32 absmax per
  256 blocks), embeddings, norms and an untied head in the compute dtype;
- LoRA A and B, their gradients, and the optimizer state (32-bit: two fp32 moments; 8-bit: two bytes and one fp32
  absmax per block of 256 for tensors of 4,096 elements or more), of which a paged optimizer keeps at most its
  page budget on the device;
- activations: what autograd saves per decoder layer for `tokens` = micro-batch x data.max_length (the worst
  batch): every layer's without gradient checkpointing; with it, the input of each layer the batch recomputes
  (:class:`RecomputeBudget`: as many as keep it within what a train.checkpoint_min_tokens batch keeps) and the
  rest of the others;
- the loss: hidden states and one chunk of fp32 logits and their gradient (only labelled positions reach lm_head);
- the transient of the largest linear: its weight dequantized in the compute dtype while it multiplies;
- after backward, the optimizer update's temporaries (its largest call, :func:`update_transient_bytes`).

The per-layer activation count is derived from the code's autograd graph (a Llama-style RMSNorm keeps its 16-bit
input, Gemma's its fp32 input; LoRA its input and its rank-r output, its dropout mask being a seed; the gated MLP
its gate and up outputs; attention q, k, v and its output); tests/unit/test_memory_plan.py holds the sum to within
10 % of a step's peak measured by torch's own allocation tracker on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from qlora_pipeline.kernels.architectures import Family, family_of_class
from qlora_pipeline.stages.contract.recompute_budget import RecomputeBudget

NF4_NESTED_BLOCK = 256
OPTIM_8BIT_BLOCK = 256
OPTIM_8BIT_MIN_SIZE = 4096
LOSS_CHUNK = 64
"""Rows per chunk of the frozen-head loss (kernels/fused_ce.py DEFAULT_CHUNK). The kernels' sizes are restated here,
kept equal by tests/unit/test_memory_plan.py, so that prepare, which plans, does not depend on the kernels' code."""
BYTES_PER_LOGIT = 6
"""Peak bytes per logit of a loss chunk (kernels/fused_ce.py BYTES_PER_LOGIT)."""
SHORT_ATTENTION_KEYS = 1024
"""Longest rows the CPU's three-op attention takes (kernels/attention.py SHORT_KEYS)."""
SHORT_ATTENTION_BACKWARD_BYTES = 12
"""Peak bytes per score of its backward, which recomputes the probabilities (kernels/attention.py
BACKWARD_BYTES_PER_SCORE)."""
SHORT_ATTENTION_QUERY_TILE = 64
"""Queries whose scores it computes at once (kernels/attention.py QUERY_TILE): a row's scores live one tile at a
time, against at most every key."""
OPTIMIZER_RUN_ELEMENTS = 2**19
"""Elements the optimizer updates in one call, small tensors together (kernels/optim/adamw_math.py BATCH_ELEMENTS)."""
UPDATE_BYTES_PER_ELEMENT = {32: 4, 8: 56}
"""Peak temporaries of that call per element, by state width (adamw_math.UPDATE_BYTES_PER_ELEMENT)."""
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """The sizes a memory plan needs, read from config.json."""

    family: Family
    layers: int
    hidden: int
    ffn: int
    vocab: int
    q_width: int
    kv_width: int
    tied: bool
    linears: dict[str, tuple[int, int]]
    norms: int
    """RMSNorms a decoder layer applies to its hidden states (Llama 2, Gemma 4)."""
    qk_norm: bool
    heads: int
    softcap: bool

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        family = family_of_class((config.get("architectures") or [None])[0])
        if family is None:
            raise ValueError(f"no memory model for {config.get('architectures')}")
        linears = family.linear_shapes(config)
        heads = int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
        return cls(
            family=family,
            layers=int(config["num_hidden_layers"]),
            hidden=int(config["hidden_size"]),
            ffn=int(config["intermediate_size"]),
            vocab=int(config["vocab_size"]),
            q_width=heads * head_dim,
            kv_width=int(config.get("num_key_value_heads") or heads) * head_dim,
            tied=bool(config.get("tie_word_embeddings", False)),
            linears=linears,
            norms=2 + sum("layernorm" in extra for extra in family.layer_extras),
            qk_norm=any("q_norm" in extra for extra in family.layer_extras),
            heads=heads,
            softcap=bool(config.get("final_logit_softcapping")),
        )


@dataclass(frozen=True)
class TrainShape:
    """What of the params sets the memory of a train step."""

    batch_size: int
    max_length: int
    lora_r: int
    targets: tuple[str, ...]
    checkpointing: bool
    adapter_bytes: int
    compute_bytes: int
    state_bits: int
    page_budget_bytes: int | None
    """Paged optimizers only: the most state bytes resident on the device (None: no limit)."""
    blocksize: int = 64
    reference_dequant: bool = True
    """The CPU's torch dequantization (fp32 values on the way); a GPU's Triton kernel writes the weight directly."""
    ranks: int = 1
    """Training processes (train.nproc), one per GPU; each takes every ranks-th example of a batch."""
    sharded: bool = False
    """FSDP2 (train.distributed: fsdp): each rank keeps 1/ranks of every decoder layer and of the adapter state."""
    short_attention: bool = False
    """On a CPU, rows of at most SHORT_ATTENTION_KEYS tokens take the three-op attention, whose backward recomputes
    a layer's probabilities."""
    weight_cache_bytes: int = 0
    """train.frozen_weight_cache_mb resolved: at most this many bytes of dequantized frozen weights are kept."""
    recompute_budget_tokens: int = 0
    """train.checkpoint_min_tokens: with checkpointing, a batch keeps at most what one of this many tokens keeps
    without recomputing (0: every layer recomputes)."""
    compiled_update: bool = False
    """On a CPU whose compiled 8-bit AdamW kernel is in use (stages/contract/cpu_kernels.py), an 8-bit update makes
    no tensor temporaries: it updates each tensor where it lies."""

    @property
    def rank_batch(self) -> int:
        """The examples one rank trains of a batch."""
        return math.ceil(self.batch_size / self.ranks)

    @property
    def tokens(self) -> int:
        return self.rank_batch * self.max_length

    @property
    def shards(self) -> int:
        return self.ranks if self.sharded else 1


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes a train step holds on its device at its peak, by kind (the largest of the forward pass's peak, at the
    loss, the backward pass's and the optimizer update's); `host_optimizer` is what a paged optimizer keeps in host
    memory."""

    phase: str
    base_nf4: int
    base_16bit: int
    lora: int
    optimizer: int
    lora_grads: int
    activations: int
    transient: int
    host_optimizer: int
    gathered: int = 0
    """FSDP2: the decoder layers gathered whole at once (the one computing and the one prefetched)."""
    weight_cache: int = 0
    """Dequantized copies of the frozen weights kept between steps (train.frozen_weight_cache_mb)."""

    @property
    def device_peak(self) -> int:
        return (
            self.base_nf4
            + self.base_16bit
            + self.lora
            + self.optimizer
            + self.lora_grads
            + self.activations
            + self.transient
            + self.gathered
            + self.weight_cache
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "device_peak": self.device_peak}


def nf4_bytes(n: int, blocksize: int) -> int:
    """Packed 4-bit codes, one uint8 absmax per block, one fp32 second-level absmax per 256 blocks (+ its code)."""
    blocks = math.ceil(n / blocksize)
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK) + 4 * 256


def optimizer_state_bytes(n: int, state_bits: int) -> int:
    """AdamW's two moments for a tensor of n elements."""
    if state_bits == 8 and n >= OPTIM_8BIT_MIN_SIZE:
        return 2 * n + 2 * 4 * math.ceil(n / OPTIM_8BIT_BLOCK)
    return 8 * n


def update_transient_bytes(sizes: list[int], state_bits: int, compiled: bool = False) -> int:
    """The optimizer update's temporaries: those of its largest call (one state width, up to a run's elements);
    none for 8-bit state updated by the `compiled` CPU kernel."""
    by_bits: dict[int, list[int]] = {}
    for n in sizes:
        by_bits.setdefault(8 if state_bits == 8 and n >= OPTIM_8BIT_MIN_SIZE else 32, []).append(n)
    runs = ((bits, min(sum(ns), OPTIMIZER_RUN_ELEMENTS + max(ns))) for bits, ns in by_bits.items())
    per_element = {**UPDATE_BYTES_PER_ELEMENT, **({8: 0} if compiled else {})}
    return max((per_element[bits] * n for bits, n in runs), default=0)


def targeted(shape: ModelShape, targets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    return {name: dims for name, dims in shape.linears.items() if name.rpartition(".")[2] in targets}


def norm_bytes(shape: ModelShape, cb: int, width: int) -> int:
    """What an RMSNorm over `width` features keeps per token: a Llama-style one its 16-bit input
    (kernels/slim_activations.py), Gemma's (1 + w) one its fp32 input and the reciprocal rms."""
    return 4 * width + 4 if shape.family.norm_offset else cb * width


def lora_input_groups(shape: ModelShape, targets: tuple[str, ...], mlp: bool) -> list[list[int]]:
    """The input widths of the targeted projections of the attention (or the MLP), one list per shared input: q, k
    and v read one tensor, gate and up another (Family.linear_sets)."""
    groups = []
    for names in shape.family.linear_sets:
        widths = [shape.linears[n][1] for n in names if n.rpartition(".")[2] in targets]
        if widths and names[0].startswith("mlp.") == mlp:
            groups.append(widths)
    return groups


def lora_bytes(t: TrainShape, groups: list[list[int]]) -> int:
    """What the LoRA branches keep per token (kernels/lora_fused.py): each shared input once, and per projection
    the rank-r product. No dropout mask: backward rebuilds it from its seed (kernels/dropout.py), on every device."""
    cb = t.compute_bytes
    return sum(group[0] * cb + t.lora_r * cb * len(group) for group in groups)


def layer_activation_bytes(shape: ModelShape, t: TrainShape) -> int:
    """Bytes autograd saves for one decoder layer's backward, for t.tokens tokens."""
    n, cb = t.tokens, t.compute_bytes
    h, q, kv = shape.hidden, shape.q_width, shape.kv_width
    norms = (shape.norms - 1) * norm_bytes(shape, cb, h)  # the MLP's norm: mlp_activation_bytes
    if shape.qk_norm:
        norms += norm_bytes(shape, cb, q) + norm_bytes(shape, cb, kv)
    attention = cb * (q + 2 * kv) + cb * q  # rotated q, k, v and the attention output (no probabilities on a CPU)
    scores = 0
    if shape.family.eager_attention:  # per head: scores, their fp32 softmax and its cast, for every query row
        scores = t.rank_batch * shape.heads * t.max_length**2 * (4 + 2 * cb)
    lora = lora_bytes(t, lora_input_groups(shape, t.targets, mlp=False))
    if "o_proj" in t.targets:  # its input is the attention output, counted above: kept once
        lora -= cb * q
    return n * (norms + lora + attention) + scores + mlp_activation_bytes(shape, t)


def mlp_activation_bytes(shape: ModelShape, t: TrainShape) -> int:
    """What a layer keeps for its MLP's backward: its norm's input, the LoRA tensors of its projections and the
    gated product's inputs (gate and up, kernels/slim_activations.py; Phi-3's fused MLP also the activation)."""
    cb = t.compute_bytes
    gated = (3 if shape.family.fused else 2) * cb * shape.ffn
    lora = lora_bytes(t, lora_input_groups(shape, t.targets, mlp=True))
    return t.tokens * (norm_bytes(shape, cb, shape.hidden) + lora + gated)


def recompute_budget(shape: ModelShape, t: TrainShape) -> RecomputeBudget:
    """The budget of a run (`t` as :func:`train_shape` makes it): per-token bytes from the plan's own layer count."""
    per_token = -(-layer_activation_bytes(shape, t) // t.tokens)
    return RecomputeBudget(
        layers=shape.layers,
        kept_per_token=per_token,
        input_per_token=shape.hidden * t.compute_bytes,
        tokens=t.recompute_budget_tokens,
    )


def plan_train(shape: ModelShape, t: TrainShape) -> MemoryPlan:
    """The peak bytes of one train step (forward, backward, optimizer update) of `shape` under `t`, on one rank."""
    cb, ab, n, shards = t.compute_bytes, t.adapter_bytes, t.tokens, t.shards
    layer_nf4 = sum(nf4_bytes(out * in_, t.blocksize) for out, in_ in shape.linears.values())
    head = shape.vocab * shape.hidden * (1 if shape.tied else 2)
    base_16bit = cb * (head + (2 * shape.layers + 1) * shape.hidden)
    lora_sizes = [t.lora_r * (out + in_) for out, in_ in targeted(shape, t.targets).values()] * shape.layers
    lora = ab * sum(lora_sizes) // shards
    state = sum(optimizer_state_bytes(size, t.state_bits) for size in lora_sizes) // shards
    device_state = state if t.page_budget_bytes is None else min(state, t.page_budget_bytes)
    layer = layer_activation_bytes(shape, t)
    residual = n * shape.hidden * cb
    recomputed = recompute_budget(shape, t).recomputed_layers(n) if t.checkpointing else 0
    saved = recomputed * residual + (shape.layers - recomputed) * layer
    # Forward peak, at the loss: every saved activation, the final norm's fp32 input and the hidden gradient the
    # loss forms, and one chunk of logits (kernels/fused_ce.py: fp32 logits made probabilities in place, a bf16 copy).
    loss_saved = n * shape.hidden * (4 + cb)
    logits = BYTES_PER_LOGIT * min(LOSS_CHUNK, n) * shape.vocab
    if shape.softcap:  # soft-capped logits take the plain loss: every chunk's logits stay saved for backward
        logits = 14 * n * shape.vocab
    forward = saved + loss_saved, logits
    # Backward peak: the adapter gradients, what is still saved, one layer's worth recomputed (when every layer is),
    # the gradient flowing between layers and, inside the MLP, into its gate and up outputs, and the larger of a
    # dequantized weight with its fp32 values (the reference path) and the CPU attention's recomputed probabilities.
    largest = max(out * in_ for out, in_ in shape.linears.values())
    cache = 0 if shards > 1 else weight_cache_bytes(shape, cb, t.weight_cache_bytes)
    flowing = 2 * residual + 2 * n * shape.ffn * cb
    transient = largest * (cb + (4 if t.reference_dequant else 0))
    if t.short_attention and t.max_length <= SHORT_ATTENTION_KEYS and not shape.family.eager_attention:
        # the attention's backward comes after the MLP's: its recomputed probabilities take the room of what the
        # MLP kept and of its flowing gradients
        tile = min(t.max_length, SHORT_ATTENTION_QUERY_TILE)
        scores = SHORT_ATTENTION_BACKWARD_BYTES * t.rank_batch * shape.heads * tile * t.max_length
        transient = max(transient, scores - 2 * n * shape.ffn * cb - mlp_activation_bytes(shape, t))
    backward = saved + (layer if recomputed == shape.layers else 0) + flowing, transient
    rank_sizes = [n // shards for n in lora_sizes]
    update = 0, update_transient_bytes(rank_sizes, t.state_bits, t.compiled_update)  # after backward: the grads
    phase, (activations, transient), grads = max(
        (("forward", forward, 0), ("backward", backward, lora), ("update", update, lora)),
        key=lambda p: sum(p[1]) + p[2],
    )
    return MemoryPlan(
        phase=phase,
        base_nf4=shape.layers * layer_nf4 // shards,
        base_16bit=base_16bit,
        lora=lora,
        optimizer=device_state,
        lora_grads=grads,
        activations=activations,
        transient=transient,
        host_optimizer=state if t.page_budget_bytes is not None else 0,
        gathered=2 * (layer_nf4 + ab * sum(lora_sizes) // shape.layers) if shards > 1 else 0,
        weight_cache=cache,
    )


def weight_cache_bytes(shape: ModelShape, compute_bytes: int, budget: int) -> int:
    """What cache_dequantized_weights keeps under `budget`: whole linear weights, in model order."""
    kept = 0
    for _ in range(shape.layers):
        for out, in_ in shape.linears.values():
            size = out * in_ * compute_bytes
            if kept + size <= budget:
                kept += size
    return kept


RECOMPUTE_FLOOR_TOKENS = 512
"""train.checkpoint_min_tokens: auto on a CPU, and the least auto takes on a GPU: on a CPU a step of bnb + peft's
padded batches took 0.875 of the time it took with every layer recomputed, with peak RSS within the bench's target
(docs/speed.md, fourth round)."""


def recompute_floor_tokens(t: Any) -> int:
    """train.checkpoint_min_tokens (a TrainParams) as the budget every device can count on: a number as given,
    auto as RECOMPUTE_FLOOR_TOKENS. Prepare's fit check plans with it; a GPU may raise auto at train time
    (memory_fit.recompute_tokens_that_fit), never lower it."""
    given = t.checkpoint_min_tokens
    return RECOMPUTE_FLOOR_TOKENS if given == "auto" else int(given)


AUTO_WEIGHT_CACHE_SHARE = 0.25
"""train.frozen_weight_cache_mb: auto on a CPU may use this share of the host's physical memory."""


def weight_cache_budget(t: Any, device_type: str) -> int:
    """train.frozen_weight_cache_mb (a TrainParams) in bytes on a `device_type`: a number as given; auto keeps
    nothing on a GPU (its memory is what 4-bit storage saves) and up to a quarter of the host's RAM on a CPU,
    where re-dequantizing every weight each step costs more time than its copy costs memory. Nothing under FSDP2
    with several processes: a rank holds only its shard of each weight (Linear4bit.store_as_parameters)."""
    if t.distributed == "fsdp" and isinstance(t.nproc, int) and t.nproc > 1:
        return 0
    if t.frozen_weight_cache_mb != "auto":
        return int(t.frozen_weight_cache_mb * 2**20)
    if device_type != "cpu":
        return 0
    import os

    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * AUTO_WEIGHT_CACHE_SHARE)


def train_shape(params: Any, config: dict[str, Any], device_type: str = "cuda", ranks: int | None = None) -> TrainShape:
    """What of `params` (a Params) sets a train step's memory, for the model of `config` on a `device_type`, with
    `ranks` processes (default: train.nproc, 1 for auto)."""
    return train_shape_of(params.train, params.data.max_length, config, device_type, ranks, params.quantize.blocksize)


def train_shape_of(
    t: Any,
    max_length: int,
    config: dict[str, Any],
    device_type: str = "cuda",
    ranks: int | None = None,
    blocksize: int = 64,
) -> TrainShape:
    """:func:`train_shape` from the train section (a TrainParams) and data.max_length: what the train stage, which
    does not read the quantize section, can ask (the NF4 block size only sizes the base's scales)."""
    from qlora_pipeline.kernels.dtypes import compute_dtype_of  # torch: imported only when a plan is made
    from qlora_pipeline.stages.contract.cpu_kernels import expected_in_use

    ranks = ranks or (t.nproc if isinstance(t.nproc, int) else 1)
    shape = ModelShape.from_config(config)
    kind = t.optimizer_kind
    budget = t.optimizer_page_budget_mb
    compute_bytes = compute_dtype_of(t.compute_dtype, device_type).itemsize
    return TrainShape(
        batch_size=t.batch_size,
        max_length=max_length,
        lora_r=t.lora_r,
        targets=tuple(t.target_modules or shape.family.lora_targets),
        checkpointing=t.gradient_checkpointing,
        recompute_budget_tokens=recompute_floor_tokens(t),
        adapter_bytes=DTYPE_BYTES[t.adapter_dtype],
        compute_bytes=compute_bytes,
        state_bits=kind.state_bits,
        page_budget_bytes=int(budget * 2**20) if kind.paged and budget is not None else None,
        blocksize=blocksize,
        reference_dequant=device_type == "cpu",
        ranks=ranks,
        sharded=ranks > 1 and t.distributed == "fsdp",
        short_attention=device_type == "cpu",
        weight_cache_bytes=weight_cache_budget(t, device_type),
        compiled_update=device_type == "cpu" and kind.state_bits == 8 and expected_in_use(),
    )


__all__ = [
    "MemoryPlan",
    "ModelShape",
    "RecomputeBudget",
    "TrainShape",
    "nf4_bytes",
    "optimizer_state_bytes",
    "plan_train",
    "recompute_budget",
    "train_shape",
    "train_shape_of",
]
