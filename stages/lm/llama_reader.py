"""llama.cpp as the GGUF reader that scores exports and proves an install works, always in a child process.

The parent-side functions (``gguf_reply_loss``, ``smoke_check``) never import ``llama_cpp``: they hand a
payload to :mod:`qlora_pipeline.stages.contract.isolation`, which runs the child-side functions
below (``_reply_loss``, ``_smoke``) in a subprocess (``sys.executable -m qlora_pipeline.stages.contract.isolation``)
with a time limit. A reader built
for the wrong CPU then costs one line naming the file and the signal, not the pipeline.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qlora_pipeline.stages.contract.isolation import Reader, call_reader
from qlora_pipeline.stages.lm.formatting import IGNORE_INDEX

LLAMA_CPP = Reader(
    name="llama.cpp (llama-cpp-python)",
    fix=(
        "rebuild the reader for this CPU with `make reader` (README: 'GGUF reader on unusual CPUs'), "
        "or set export.score_gguf: false to export without scoring"
    ),
)


def gguf_reply_loss(path: Path, rows: list[tuple[list[int], list[int]]], timeout_s: float) -> dict[str, float]:
    """Token-weighted reply loss of a GGUF file from llama.cpp's own logits: {'loss', 'tokens'}."""
    payload = {"path": str(path), "rows": [[list(ids), list(labels)] for ids, labels in rows]}
    out = call_reader(LLAMA_CPP, f"{__name__}:_reply_loss", payload, path, timeout_s)
    return {"loss": out["loss_sum"] / max(out["tokens"], 1), "tokens": out["tokens"]}


def smoke_check(path: Path, timeout_s: float = 120.0) -> dict[str, Any]:
    """Load a GGUF, evaluate a few tokens and return what llama.cpp reports (system info, logits checked finite)."""
    return call_reader(LLAMA_CPP, f"{__name__}:_smoke", {"path": str(path)}, path, timeout_s)


def _threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def _reply_loss(payload: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    from llama_cpp import Llama

    rows = payload["rows"]
    n_ctx = max(len(ids) for ids, _ in rows) + 8
    llm = Llama(model_path=payload["path"], n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=_threads())
    total, count = 0.0, 0
    for ids, labels in rows:
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
        target = np.asarray(labels[1:])
        keep = target != IGNORE_INDEX
        if not keep.any():
            continue
        z = logits[keep]
        peak = z.max(axis=1)
        lse = peak + np.log(np.exp(z - peak[:, None]).sum(axis=1))
        total += float((lse - z[np.arange(z.shape[0]), target[keep]]).sum())
        count += int(keep.sum())
    return {"loss_sum": total, "tokens": count}


def _smoke(payload: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    # ~100 tokens in one batch: batched matrix products take other code paths (repacked, AMX where built) than
    # single-token decoding, and scoring uses the batched ones.
    llm = Llama(model_path=payload["path"], n_ctx=256, logits_all=True, verbose=False, n_threads=_threads())
    ids = llm.tokenize(b"Paris is a city in France. " * 14 + b"The capital of France is")
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    if not np.isfinite(logits).all():
        raise ValueError("llama.cpp returned non-finite logits")
    info = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    return {
        "version": llama_cpp.__version__,
        "tokens": len(ids),
        "n_vocab": int(logits.shape[1]),
        "next_token": llm.detokenize([int(logits[-1].argmax())]).decode(errors="replace"),
        "system_info": info,
    }
