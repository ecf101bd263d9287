"""llama.cpp as a test oracle, always in a child process (qlora_pipeline.stages.contract.isolation), never in
the pytest process.

A llama.cpp build that faults on this CPU then fails the tests that use it with one line naming the signal,
and the rest of the suite still runs and reports.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from qlora_pipeline.stages.contract.isolation import Reader, call_reader

ORACLE = Reader(name="llama.cpp (llama-cpp-python, test oracle)", fix="rebuild it with `make reader`")
TIMEOUT_S = 300.0

# What the quantized weights themselves cost (transformers' load of the GGUF vs the 16-bit source), measured
# on these tiny models (llama = mistral / qwen2 / qwen3 with head_dim 128): Q8_0 0.014 / 0.013 / 0.017, Q4_0
# 0.196 / 0.198 / 0.207, Q4_K_M 0.121 / 0.133 / 0.168 (2026-12-03 and -04).
# The bytes of every quantized tensor are checked against llama.cpp's own quantizer in
# tests/unit/test_gguf_export.py; these bounds only document the format's cost.
QUANT_COST = {"F16": 1e-6, "Q8_0": 0.02, "Q4_0": 0.25, "Q4_K_M": 0.2, "Q5_K_M": 0.12}
# llama.cpp vs transformers on the same GGUF file: llama.cpp quantizes activations to 8 bits for quantized
# matmuls. Measured 2026-12-03: F16 0.0005, Q8_0 0.0094, Q4_0 0.012, Q4_K_M 0.015 (both architectures).
READER_GAP = {"F16": 0.002, "Q8_0": 0.03, "Q4_0": 0.03, "Q4_K_M": 0.03, "Q5_K_M": 0.03}


def require() -> None:
    """Skip when llama-cpp-python is not installed at all (CI installs it through `make setup`)."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (make reader)")


def read(path: Path, text: str, ids: list[int], n_generate: int = 4, lora: Path | None = None) -> dict[str, Any]:
    """Tokenize `text`, detokenize `ids`, logits of `ids` and a short greedy generation, from one load of `path`
    (with the GGUF LoRA adapter `lora` applied, when given)."""
    require()
    payload = {"path": str(path), "text": text, "ids": ids, "n_generate": n_generate, "lora": lora and str(lora)}
    return call_reader(ORACLE, f"{__name__}:_read", payload, path, TIMEOUT_S)


def quantize(src: Path, dst: Path, qtype: str) -> None:
    """llama.cpp's own quantizer (`llama_model_quantize`) from an F32 GGUF to `qtype`, one thread."""
    require()
    out = call_reader(
        ORACLE, f"{__name__}:_quantize", {"src": str(src), "dst": str(dst), "qtype": qtype}, src, TIMEOUT_S
    )
    assert out["rc"] == 0, f"llama_model_quantize failed with {out['rc']}"


def _read(payload: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(
        model_path=payload["path"],
        lora_path=payload.get("lora"),
        logits_all=True,
        n_ctx=128,
        n_threads=2,
        verbose=False,
        seed=0,
    )
    ids = payload["ids"]
    tokens = llm.tokenize(payload["text"].encode(), add_bos=False, special=False)
    detok = llm.detokenize(ids).decode()
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.reset()
    # Greedy tokens straight from generate(): a completion call keeps going while its text is not yet valid UTF-8,
    # which a random tiny model can keep up until the context is full.
    generated_ids: list[int] = []
    for token in llm.generate(llm.tokenize(b"Hello", add_bos=False), temp=0.0):
        generated_ids.append(token)
        if len(generated_ids) >= payload["n_generate"]:
            break
    generated = llm.detokenize(generated_ids).decode(errors="replace")
    return {"tokens": tokens, "detok": detok, "logits": logits, "generated": generated, "n_tokens": llm.n_tokens}


def _quantize(payload: dict[str, Any]) -> dict[str, Any]:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{payload['qtype']}")
    params.nthread = 1
    rc = llama_cpp.llama_model_quantize(payload["src"].encode(), payload["dst"].encode(), ctypes.byref(params))
    return {"rc": int(rc)}
