"""The model families the pipeline supports, with the name each tool knows them by: the one list of them.

A family is a Hugging Face causal-LM class (``config.json`` ``architectures[0]``), its ``model_type``, the
architecture name llama.cpp uses in a GGUF file (``general.architecture``) and the facts the writers need about it:
the one place a family differs, so no stage or writer branches on a family's name. Prepare refuses other models,
and each writer (GPTQ, GGUF) refuses them with the same kind of message, built by :func:`unsupported_architecture`.
"""

from __future__ import annotations

from dataclasses import dataclass


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
