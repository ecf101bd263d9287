"""export: requantize the merged 16-bit model for serving — GGUF (llama.cpp/Ollama) and GPTQ v1 (transformers,
vLLM) — and score every file on the test split with a real reader.

Output `artifacts/export/`: `gguf/model-<TYPE>.gguf` per type, `gptq/` (HF folder with quantization_config),
`export_report.json` and `export_report.md` (format, size, test perplexity, export time).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from qlora_pipeline.kernels.dtypes import default_compute_dtype
from qlora_pipeline.stages.contract.artifacts import Manifest
from qlora_pipeline.stages.contract.errors import InputError
from qlora_pipeline.stages.contract.params import Params
from qlora_pipeline.stages.contract.runtime import code_version
from qlora_pipeline.stages.contract.stage import StageContext, execute
from qlora_pipeline.stages.lm.batching import token_rows
from qlora_pipeline.stages.lm.llama_reader import gguf_reply_loss
from qlora_pipeline.stages.lm.lm_loss import heldout_loss
from qlora_pipeline.stages.lm.modelio import load_16bit_model, pad_token_id
from qlora_pipeline.stages.lm.report import markdown_table

STAGE = "export"
NOT_SCORED = "not scored"


def check_base_model(model_dir: Path, params: Params) -> None:
    """What export will need from the base model, read from its config and tokenizer (seconds, no weights): the GGUF
    writer takes its architecture, rope scaling and tokenizer, GPTQ its linear shapes. Prepare's preflight calls
    this (`Stage.check_base_model`), so a run that would fail here fails before any training, with the setting to
    change."""
    from qlora_pipeline.kernels.formats.gguf_tensors import read_hparams
    from qlora_pipeline.kernels.formats.gguf_vocab import read_tokenizer
    from qlora_pipeline.kernels.gptq_model import check_config
    from qlora_pipeline.stages.lm.modelio import supported_config

    x = params.export
    found = supported_config(model_dir)
    if found is None:
        return  # prepare itself says what is wrong with the folder
    _, cfg = found
    if x.gguf_types:
        try:
            hp = read_hparams(cfg)
            read_tokenizer(model_dir, cfg, hp, None)
        except (ValueError, KeyError) as exc:
            raise InputError(
                f"GGUF export would fail on {model_dir}: {exc}; change export.gguf_types ([] skips GGUF)"
            ) from None
    if x.gptq:
        try:
            check_config(cfg, x.gptq_bits, x.gptq_group_size)
        except (ValueError, KeyError) as exc:
            raise InputError(
                f"GPTQ export would fail on {model_dir}: {exc}; change export.gptq_group_size or set export.gptq: false"
            ) from None


def test_rows(ctx: StageContext) -> list[tuple[list[int], list[int]]]:
    import datasets

    return token_rows(datasets.load_from_disk(str(ctx.parent_dir("prepare") / "data"))["test"])


def calibration_ids(ctx: StageContext, n: int) -> list[torch.Tensor]:
    """GPTQ calibration activations come from the training split (never the test split we score on)."""
    import datasets

    train = datasets.load_from_disk(str(ctx.parent_dir("prepare") / "data"))["train"]
    n = min(n, len(train))
    return [torch.tensor(train[i]["input_ids"]).unsqueeze(0) for i in range(n)]


def load_merged(merged_dir: Path, device: torch.device) -> Any:
    """The merged 16-bit model for scoring: its bf16 values, computed in the device's compute dtype (fp32 on a CPU
    without bf16 arithmetic, where bf16 matmuls run ~24x slower: an exact upcast)."""
    model = load_16bit_model(merged_dir, torch.bfloat16).eval()
    return model.to(device=device, dtype=default_compute_dtype(device))


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

    from qlora_pipeline.kernels.formats.gptq_folder import unpack_gptq_v1
    from qlora_pipeline.kernels.gptq import rtn_quantize

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(gptq_dir.glob("*.safetensors")):
        tensors.update(load_file(f))
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".qweight")})
    out = {}
    for kind in ("gptq", "rtn"):
        model = load_merged(merged_dir, device)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for m in modules:
                w = params[f"{m}.weight"]
                if kind == "gptq":
                    sub = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == m}
                    deq = unpack_gptq_v1({k: v.to(device) for k, v in sub.items()})
                else:
                    deq = rtn_quantize(w.float(), bits=bits, group_size=group_size).dequantized
                w.copy_(deq.to(torch.bfloat16).reshape(w.shape))  # the bf16 values a 16-bit load would hold
        out[kind] = heldout_loss(model, rows, batch_size, pad)["loss"]
        del model, params  # the whole copy (params held it too), before the next one loads
    return out


@dataclass
class ExportRow:
    """One line of the export report: a served format, its size and its loss on the test split."""

    format: str
    key: str
    file: str | None
    bytes: int
    loss: float | None
    seconds: float | None
    scored_by: str | None = None

    @property
    def perplexity(self) -> float | None:
        return None if self.loss is None else math.exp(self.loss)


def lineage_metadata(ctx: StageContext) -> dict[str, str]:
    """What each GGUF file carries about where it came from (read by `qlora trace` and any GGUF reader)."""
    return {
        "qlora.code_commit": str(code_version().get("commit") or ""),
        "qlora.merge_manifest_sha256": ctx.parents["merge"].outputs.get("model/model.safetensors", ""),
        "qlora.dataset_sha256": json.dumps(
            {k: v for k, v in ctx.parents["prepare"].inputs.items() if k.startswith("dataset/")}, sort_keys=True
        ),
    }


def export_gguf(ctx: StageContext, merged: Path, rows: list) -> tuple[list[ExportRow], dict[str, Any]]:
    """One GGUF file per `export.gguf_types`, each scored by llama.cpp in a child process (unless turned off);
    returns the report rows and the K-quant fallbacks per type."""
    from qlora_pipeline.kernels.formats.gguf_file import write_gguf

    x = ctx.params.export
    gguf_dir = ctx.out / "gguf"
    gguf_dir.mkdir()
    metadata = lineage_metadata(ctx)
    table: list[ExportRow] = []
    fallbacks: dict[str, Any] = {}
    for qtype in x.gguf_types:
        path = gguf_dir / f"model-{qtype}.gguf"
        t0 = time.perf_counter()
        try:
            stats = write_gguf(merged, path, qtype, metadata=metadata)
        except ValueError as exc:
            raise InputError(f"GGUF export ({qtype}) failed: {exc}") from None
        dt = time.perf_counter() - t0
        if stats.get("fallbacks"):
            fallbacks[qtype] = stats["fallbacks"]
        scored = gguf_reply_loss(path, rows, x.reader_timeout_s)["loss"] if x.score_gguf else None
        scored_by = "llama.cpp" if x.score_gguf else NOT_SCORED
        table.append(
            ExportRow(f"GGUF {qtype}", f"gguf_{qtype}", f"gguf/{path.name}", path.stat().st_size, scored, dt, scored_by)
        )
    return table, fallbacks


def export_gptq(ctx: StageContext, merged: Path, rows: list, pad: int) -> list[ExportRow]:
    """The GPTQ v1 checkpoint (calibrated on the train split), scored, and round-to-nearest on the same groups as
    the reference it must beat."""
    from qlora_pipeline.kernels.formats.gptq_folder import write_gptq_checkpoint

    x = ctx.params.export
    device = torch.device(ctx.device)
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
    bs = ctx.params.evaluate.batch_size
    losses = gptq_losses(ctx.out / "gptq", merged, rows, pad, x.gptq_group_size, x.gptq_bits, bs, device)
    size = sum(f.stat().st_size for f in (ctx.out / "gptq").glob("*.safetensors"))
    groups = f"{x.gptq_bits}-bit g{x.gptq_group_size}"
    return [
        ExportRow(f"GPTQ {groups}", "gptq", "gptq/", size, losses["gptq"], dt),
        ExportRow(f"RTN {groups} (same groups, reference)", "rtn", None, size, losses["rtn"], None),
    ]


def write_report(out: Path, table: list[ExportRow], fallbacks: dict[str, Any], n_rows: int, ctx: StageContext) -> None:
    """`export_report.json` (every row) and `export_report.md` (the table a model card embeds)."""
    scored = ctx.params.export.score_gguf
    rows = []
    for r in table:
        d = asdict(r)
        if r.scored_by is None:
            d.pop("scored_by")
        rows.append({**d, "perplexity": r.perplexity})
    report = {"rows": rows, "k_quant_fallbacks": fallbacks, "test_examples": n_rows, "device": ctx.device}
    (out / "export_report.json").write_text(json.dumps({**report, "gguf_scored": scored}, indent=1))
    cells = [
        (
            r.format,
            f"{r.bytes / 2**20:.1f}",
            NOT_SCORED if r.loss is None else f"{r.loss:.4f}",
            NOT_SCORED if r.perplexity is None else f"{r.perplexity:.2f}",
            "" if r.seconds is None else f"{r.seconds:.1f}",
        )
        for r in table
    ]
    lines = markdown_table(("format", "size MiB", "test loss", "perplexity", "export s"), cells)
    notes = [f"Scored on the test split ({n_rows} rows): torch models on {ctx.device}, GGUF by llama.cpp on the CPU."]
    if not scored:
        notes.append(f"GGUF files were {NOT_SCORED}: export.score_gguf is false in params.yaml.")
    (out / "export_report.md").write_text("\n".join([*lines, "", *notes]) + "\n")


def body(ctx: StageContext) -> dict[str, Any]:
    from transformers import AutoTokenizer

    x = ctx.params.export
    merged = ctx.parent_dir("merge") / "model"
    pad = pad_token_id(AutoTokenizer.from_pretrained(merged))
    rows = test_rows(ctx)
    merged_model = load_merged(merged, torch.device(ctx.device))
    merged_loss = heldout_loss(merged_model, rows, ctx.params.evaluate.batch_size, pad)["loss"]
    del merged_model
    size = sum(f.stat().st_size for f in merged.glob("*.safetensors"))
    table = [ExportRow("merged bf16 (safetensors)", "merged_bf16", "../merge/model", size, merged_loss, 0.0)]
    gguf_rows, fallbacks = export_gguf(ctx, merged, rows)
    table += gguf_rows
    if x.gptq:
        table += export_gptq(ctx, merged, rows, pad)
    write_report(ctx.out, table, fallbacks, len(rows), ctx)
    formats = {r.key: {"loss": r.loss, "mib": round(r.bytes / 2**20, 2)} for r in table}
    return {"formats": formats, "gguf_scored": x.score_gguf}


def run(params: Params, parent_run_id: str | None = None) -> Manifest:
    return execute(STAGE, params, body, parent_run_id)
