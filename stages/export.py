"""export: requantize the merged 16-bit model for serving — GGUF (llama.cpp/Ollama) and GPTQ v1 (transformers,
vLLM) — and score every file on the test split with a real reader.

Output `artifacts/export/`: `gguf/model-<TYPE>.gguf` per type, `gptq/` (HF folder with quantization_config),
`export_report.json` and `export_report.md` (format, size, test perplexity, export time).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from stages.common.errors import InputError
from stages.common.llama_reader import gguf_reply_loss
from stages.common.lm_loss import heldout_loss
from stages.common.modelio import pad_token_id
from stages.common.params import Params
from stages.common.runtime import code_version
from stages.common.stage import StageContext, execute, stage_main

STAGE = "export"
NOT_SCORED = "not scored"


def test_rows(ctx: StageContext) -> list[tuple[list[int], list[int]]]:
    import datasets

    test = datasets.load_from_disk(str(ctx.parent_dir("prepare") / "data"))["test"]
    return list(zip(test["input_ids"], test["labels"], strict=True))


def calibration_ids(ctx: StageContext, n: int) -> list[torch.Tensor]:
    """GPTQ calibration activations come from the training split (never the test split we score on)."""
    import datasets

    train = datasets.load_from_disk(str(ctx.parent_dir("prepare") / "data"))["train"]
    n = min(n, len(train))
    return [torch.tensor(train[i]["input_ids"]).unsqueeze(0) for i in range(n)]


def gptq_losses(
    gptq_dir: Path,
    merged_dir: Path,
    rows: list,
    pad: int,
    group_size: int,
    bits: int,
    batch_size: int,
    device: torch.device,
) -> dict[str, float]:
    """Loss of the GPTQ checkpoint (decoded by our independent spec-based unpacker) and of round-to-nearest
    on the same groups, each loaded into the merged model's architecture."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from kernels.gptq import rtn_quantize
    from kernels.gptq_format import unpack_gptq_v1

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(gptq_dir.glob("*.safetensors")):
        tensors.update(load_file(f))
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".qweight")})
    out = {}
    for kind in ("gptq", "rtn"):
        model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.bfloat16).eval().to(device)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for m in modules:
                w = params[f"{m}.weight"]
                if kind == "gptq":
                    sub = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == m}
                    deq = unpack_gptq_v1({k: v.to(device) for k, v in sub.items()})
                else:
                    deq = rtn_quantize(w.float(), bits=bits, group_size=group_size).dequantized
                w.copy_(deq.to(w.dtype).reshape(w.shape))
        out[kind] = heldout_loss(model, rows, batch_size, pad)["loss"]
        del model
    return out


def body(ctx: StageContext) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kernels.gguf_export import write_gguf
    from kernels.gptq_model import write_gptq_checkpoint

    x = ctx.params.export
    merged = ctx.parent_dir("merge") / "model"
    tok = AutoTokenizer.from_pretrained(merged)
    pad = pad_token_id(tok)
    rows = test_rows(ctx)
    bs = ctx.params.evaluate.batch_size
    lineage = {
        "qlora.code_commit": str(code_version().get("commit") or ""),
        "qlora.merge_manifest_sha256": ctx.parents["merge"].outputs.get("model/model.safetensors", ""),
        "qlora.dataset_sha256": json.dumps(
            {k: v for k, v in ctx.parents["prepare"].inputs.items() if k.startswith("dataset/")}, sort_keys=True
        ),
    }
    table: list[dict[str, Any]] = []
    device = torch.device(ctx.device)
    merged_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16).eval().to(device)
    merged_loss = heldout_loss(merged_model, rows, bs, pad)["loss"]
    del merged_model
    table.append(
        {
            "format": "merged bf16 (safetensors)",
            "key": "merged_bf16",
            "file": "../merge/model",
            "bytes": sum(f.stat().st_size for f in merged.glob("*.safetensors")),
            "loss": merged_loss,
            "seconds": 0.0,
        }
    )
    gguf_dir = ctx.out / "gguf"
    gguf_dir.mkdir()
    fallbacks: dict[str, Any] = {}
    for qtype in x.gguf_types:
        path = gguf_dir / f"model-{qtype}.gguf"
        t0 = time.perf_counter()
        try:
            stats = write_gguf(merged, path, qtype, metadata=lineage)
        except ValueError as exc:
            raise InputError(f"GGUF export ({qtype}) failed: {exc}") from None
        dt = time.perf_counter() - t0
        if stats.get("fallbacks"):
            fallbacks[qtype] = stats["fallbacks"]
        scored = gguf_reply_loss(path, rows, x.reader_timeout_s)["loss"] if x.score_gguf else None
        table.append(
            {
                "format": f"GGUF {qtype}",
                "key": f"gguf_{qtype}",
                "file": f"gguf/{path.name}",
                "bytes": path.stat().st_size,
                "loss": scored,
                "scored_by": "llama.cpp" if x.score_gguf else NOT_SCORED,
                "seconds": dt,
            }
        )
    if x.gptq:
        t0 = time.perf_counter()
        try:
            write_gptq_checkpoint(
                merged,
                ctx.out / "gptq",
                calibration_ids(ctx, x.gptq_calibration_samples),
                bits=x.gptq_bits,
                group_size=x.gptq_group_size,
                damp_percent=x.gptq_damp_percent,
                device=device,
            )
        except ValueError as exc:
            raise InputError(f"GPTQ export failed: {exc}; fix export.* in params.yaml") from None
        dt = time.perf_counter() - t0
        losses = gptq_losses(ctx.out / "gptq", merged, rows, pad, x.gptq_group_size, x.gptq_bits, bs, device)
        size = sum(f.stat().st_size for f in (ctx.out / "gptq").glob("*.safetensors"))
        table.append(
            {
                "format": f"GPTQ {x.gptq_bits}-bit g{x.gptq_group_size}",
                "key": "gptq",
                "file": "gptq/",
                "bytes": size,
                "loss": losses["gptq"],
                "seconds": dt,
            }
        )
        table.append(
            {
                "format": f"RTN {x.gptq_bits}-bit g{x.gptq_group_size} (same groups, reference)",
                "key": "rtn",
                "file": None,
                "bytes": size,
                "loss": losses["rtn"],
                "seconds": None,
            }
        )
    for row in table:
        row["perplexity"] = None if row["loss"] is None else math.exp(row["loss"])
    report = {
        "rows": table,
        "k_quant_fallbacks": fallbacks,
        "test_examples": len(rows),
        "device": ctx.device,
        "gguf_scored": x.score_gguf,
    }
    (ctx.out / "export_report.json").write_text(json.dumps(report, indent=1))
    lines = ["| format | size MiB | test loss | perplexity | export s |", "|---|---|---|---|---|"]
    for r in table:
        loss = NOT_SCORED if r["loss"] is None else f"{r['loss']:.4f}"
        ppl = NOT_SCORED if r["perplexity"] is None else f"{r['perplexity']:.2f}"
        secs = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(f"| {r['format']} | {r['bytes'] / 2**20:.1f} | {loss} | {ppl} | {secs} |")
    notes = [
        f"Scored on the test split ({len(rows)} rows): torch models on {ctx.device}, GGUF by llama.cpp on the CPU."
    ]
    if not x.score_gguf:
        notes.append(f"GGUF files were {NOT_SCORED}: export.score_gguf is false in params.yaml.")
    (ctx.out / "export_report.md").write_text("\n".join([*lines, "", *notes]) + "\n")
    formats = {r["key"]: {"loss": r["loss"], "mib": round(r["bytes"] / 2**20, 2)} for r in table}
    return {"formats": formats, "gguf_scored": x.score_gguf}


def run(params: Params) -> Any:
    return execute(STAGE, params, body)


if __name__ == "__main__":
    raise SystemExit(stage_main(STAGE, run))
