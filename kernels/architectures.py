"""The model families the pipeline supports, with the name each tool knows them by: the one list of them.

A family is a Hugging Face causal-LM class (``config.json`` ``architectures[0]``), its ``model_type`` and the
architecture name llama.cpp uses in a GGUF file (``general.architecture``). Prepare refuses other models, and each
writer (GPTQ, GGUF) refuses them with the same kind of message, built by :func:`unsupported_architecture`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    hf_class: str
    model_type: str
    gguf_arch: str


FAMILIES: tuple[Family, ...] = (
    Family(hf_class="LlamaForCausalLM", model_type="llama", gguf_arch="llama"),
    Family(hf_class="Qwen2ForCausalLM", model_type="qwen2", gguf_arch="qwen2"),
    # Mistral is Llama's layout to llama.cpp (its converter writes arch "llama", Q/K permuted); sliding-window
    # attention, where a config sets it, only matters past the window, and llama.cpp's llama arch does not apply it.
    Family(hf_class="MistralForCausalLM", model_type="mistral", gguf_arch="llama"),
    # Qwen3: Qwen2's layout without q/k/v biases, plus an RMSNorm over each head of q and k (attn_q_norm/attn_k_norm).
    Family(hf_class="Qwen3ForCausalLM", model_type="qwen3", gguf_arch="qwen3"),
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
