"""The model families the pipeline supports, with the name each tool knows them by: the one list of them.

A family is a Hugging Face causal-LM class (``config.json`` ``architectures[0]``), its ``model_type``, the
architecture name llama.cpp uses in a GGUF file (``general.architecture``) and the facts the writers need about it:
the one place a family differs, so no stage or writer branches on a family's name. Prepare refuses other models,
and each writer (GPTQ, GGUF) refuses them with the same kind of message, built by :func:`unsupported_architecture`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Family:
    hf_class: str
    model_type: str
    gguf_arch: str
    gguf_permute_qk: bool
    """llama.cpp's arch applies rope to adjacent pairs (NORM), HF to halves: Q and K rows are permuted on export
    (docs/formats.md, GGUF). NEOX-rope archs (qwen2, qwen3) take HF's layout as is."""
    gguf_pre: str
    """`tokenizer.ggml.pre` when the tokenizer itself does not say which pre-tokenizer it is."""
    layer_extras: tuple[str, ...] = ()
    """Per-layer tensors the family has beyond the Llama set (names under `model.layers.N.`)."""
    llama3_rope: bool = False
    """Takes Llama 3.x `llama3` rope scaling (as a `rope_freqs.weight` tensor in GGUF)."""
    fused: bool = False
    """Phi-3's layout: one `qkv_proj` and one `gate_up_proj` per layer instead of q/k/v and gate/up."""
    norm_offset: bool = False
    """Gemma's RMSNorm scales by (1 + w); llama.cpp's by w, so the converter stores w + 1."""
    gguf_layer_names: tuple[tuple[str, str], ...] = ()
    """Per-layer GGUF names that differ from Llama's (HF name under `model.layers.N.`, GGUF name under `blk.N.`)."""
    eager_attention: bool = False
    """Runs transformers' eager attention (no SDPA; the scores of every head are materialised, which the memory plan
    counts): Gemma 2 soft-caps its scores, which SDPA cannot do. The loaders set it (kernels/attention.py,
    :func:`use_family_attention`), whatever the installed transformers defaults to."""
    gguf_query_scale_27b_layers: int = 0
    """Gemma: llama.cpp scales queries by 1/sqrt(head_dim), except in the model with this many layers (the 27B), by
    1/sqrt(hidden / heads); a config whose `query_pre_attn_scalar` is neither cannot be written."""

    @property
    def linear_sets(self) -> tuple[tuple[str, ...], ...]:
        """The decoder block's linears grouped by shared input, in execution order (GPTQ calibrates per group)."""
        return FUSED_LINEAR_SETS if self.fused else LINEAR_SETS

    @property
    def lora_targets(self) -> tuple[str, ...]:
        """Every projection of the block: LoRA's default targets (the QLoRA recipe adapts all linear layers)."""
        return tuple(name.rpartition(".")[2] for group in self.linear_sets for name in group)

    def linear_shapes(self, config: dict[str, Any]) -> dict[str, tuple[int, int]]:
        """`(out, in)` of each block linear, from config.json alone."""
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or hidden // heads)
        q, kv = heads * head_dim, int(config.get("num_key_value_heads") or heads) * head_dim
        ffn = int(config["intermediate_size"])
        if self.fused:
            return {
                "self_attn.qkv_proj": (q + 2 * kv, hidden),
                "self_attn.o_proj": (hidden, q),
                "mlp.gate_up_proj": (2 * ffn, hidden),
                "mlp.down_proj": (hidden, ffn),
            }
        return {
            "self_attn.q_proj": (q, hidden),
            "self_attn.k_proj": (kv, hidden),
            "self_attn.v_proj": (kv, hidden),
            "self_attn.o_proj": (hidden, q),
            "mlp.gate_proj": (ffn, hidden),
            "mlp.up_proj": (ffn, hidden),
            "mlp.down_proj": (hidden, ffn),
        }


LINEAR_SETS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
FUSED_LINEAR_SETS: tuple[tuple[str, ...], ...] = (
    ("self_attn.qkv_proj",),
    ("self_attn.o_proj",),
    ("mlp.gate_up_proj",),
    ("mlp.down_proj",),
)


GEMMA_LAYER_NAMES = (
    ("post_attention_layernorm.weight", "post_attention_norm.weight"),
    ("pre_feedforward_layernorm.weight", "ffn_norm.weight"),
    ("post_feedforward_layernorm.weight", "post_ffw_norm.weight"),
)

FAMILIES: tuple[Family, ...] = (
    Family("LlamaForCausalLM", "llama", "llama", gguf_permute_qk=True, gguf_pre="gpt-2", llama3_rope=True),
    Family(
        "Qwen2ForCausalLM",
        "qwen2",
        "qwen2",
        gguf_permute_qk=False,
        gguf_pre="qwen2",
        layer_extras=("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    ),
    # Mistral is Llama's layout to llama.cpp (its converter writes arch "llama", Q/K permuted); sliding-window
    # attention, where a config sets it, only matters past the window, and llama.cpp's llama arch does not apply it.
    Family("MistralForCausalLM", "mistral", "llama", gguf_permute_qk=True, gguf_pre="gpt-2"),
    # Qwen3: Qwen2's layout without q/k/v biases, plus an RMSNorm over each head of q and k (attn_q_norm/attn_k_norm).
    Family(
        "Qwen3ForCausalLM",
        "qwen3",
        "qwen3",
        gguf_permute_qk=False,
        gguf_pre="qwen2",
        layer_extras=("self_attn.q_norm.weight", "self_attn.k_norm.weight"),
    ),
    # Phi-3 (mini/medium, 4k/128k without longrope): fused qkv and gate_up; GGUF arch phi3 takes them fused
    # (attn_qkv, and ffn_up holding gate then up), NEOX rope.
    # Gemma 2: four norms per layer, (1 + w) norms, embeddings scaled by sqrt(hidden) and tied, attention and final
    # logit soft-capping, sliding window on alternate layers; llama.cpp's gemma2 arch does each of these itself.
    Family(
        "Gemma2ForCausalLM",
        "gemma2",
        "gemma2",
        gguf_permute_qk=False,
        gguf_pre="default",
        layer_extras=("pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"),
        norm_offset=True,
        gguf_layer_names=GEMMA_LAYER_NAMES,
        eager_attention=True,
        gguf_query_scale_27b_layers=46,
    ),
    # Gemma 3 (text: 270M/1B as Gemma3ForCausalLM): Gemma 2's layout plus (1 + w) RMSNorms over each head of q and k,
    # no soft-capping, 5 sliding layers to 1 global with their own rope bases (10k local, 1M global + linear scaling).
    Family(
        "Gemma3ForCausalLM",
        "gemma3_text",
        "gemma3",
        gguf_permute_qk=False,
        gguf_pre="default",
        layer_extras=(
            "pre_feedforward_layernorm.weight",
            "post_feedforward_layernorm.weight",
            "self_attn.q_norm.weight",
            "self_attn.k_norm.weight",
        ),
        norm_offset=True,
        gguf_layer_names=GEMMA_LAYER_NAMES,
        gguf_query_scale_27b_layers=62,
    ),
    Family("Phi3ForCausalLM", "phi3", "phi3", gguf_permute_qk=False, gguf_pre="gpt-2", fused=True),
)
SUPPORTED_CLASSES: tuple[str, ...] = tuple(f.hf_class for f in FAMILIES)


def family_of_class(hf_class: str | None) -> Family | None:
    """The family whose HF class is ``hf_class`` (``config["architectures"][0]``), or None."""
    return next((f for f in FAMILIES if f.hf_class == hf_class), None)


def family_of_model_type(model_type: str | None) -> Family | None:
    """The family whose ``config.json`` ``model_type`` is ``model_type``, or None."""
    return next((f for f in FAMILIES if f.model_type == model_type), None)


def unsupported_architecture(arch: str | None, context: str) -> str:
    """The one-line refusal, e.g. ``unsupported architecture GPT2LMHeadModel for GPTQ; supported: LlamaForCausalLM,
    Qwen2ForCausalLM`` (``context`` is ``"for GPTQ"``, ``"in <path>"``, ...)."""
    return f"unsupported architecture {arch} {context}; supported: {', '.join(SUPPORTED_CLASSES)}"


__all__ = [
    "FAMILIES",
    "SUPPORTED_CLASSES",
    "Family",
    "family_of_class",
    "family_of_model_type",
    "unsupported_architecture",
]
