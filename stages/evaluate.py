"""evaluate: held-out loss and perplexity of the 16-bit base, the NF4 base, NF4 + adapter and the merged
model on the test split, greedy generations side by side, and a report a reviewer opens without Python.
When train trained the 16-bit LoRA baseline, its adapter on the 16-bit base too, and the gap QLoRA − LoRA (what
4 bits cost after fine-tuning); after a LoftQ quantize, the NF4 base + LoftQ's starting adapter (step 0).

Output `artifacts/evaluate/`: `metrics.json` (also the DVC metrics), `report.md`, `report.html` (plots
embedded), `generations.json`, `loss_curve.png`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from qlora_pipeline.kernels.dtypes import default_compute_dtype, dtype_name
from qlora_pipeline.kernels.lora import module_device
from qlora_pipeline.stages.contract.artifacts import Manifest
from qlora_pipeline.stages.contract.host_heap import return_freed_heap
from qlora_pipeline.stages.contract.params import Params
from qlora_pipeline.stages.contract.stage import StageContext, execute
from qlora_pipeline.stages.lm.batching import token_rows
from qlora_pipeline.stages.lm.conversations import Record
from qlora_pipeline.stages.lm.data_report import data_section
from qlora_pipeline.stages.lm.formatting import prompt_text
from qlora_pipeline.stages.lm.lm_loss import heldout_loss
from qlora_pipeline.stages.lm.modelio import cast_parameters, load_16bit_model, pad_token_id
from qlora_pipeline.stages.lm.report import html_page, markdown_table

STAGE = "evaluate"
MODELS = ("base_16bit", "base_nf4", "loftq_start", "lora16", "nf4_adapter", "merged")
LABELS = {
    "base_16bit": "16-bit base",
    "base_nf4": "NF4 base",
    "loftq_start": "NF4 base + LoftQ start (step 0)",
    "lora16": "16-bit base + 16-bit LoRA (baseline)",
    "nf4_adapter": "NF4 base + adapter (QLoRA)",
    "merged": "merged 16-bit",
}


def present_models(ctx: StageContext) -> list[str]:
    """The variants this run has: the baseline and the LoftQ start only when train / quantize made them."""
    from qlora_pipeline.stages.lm.lora16 import ADAPTER
    from qlora_pipeline.stages.lm.lora_plan import LOFTQ_ADAPTER

    have = {
        "loftq_start": (ctx.parent_dir("quantize") / LOFTQ_ADAPTER).is_dir(),
        "lora16": (ctx.parent_dir("train") / ADAPTER).is_dir(),
    }
    return [name for name in MODELS if have.get(name, True)]


def with_adapter(model: Any, adapter: Path) -> Any:
    """`model` with the PEFT adapter in `adapter` applied (no dropout)."""
    from qlora_pipeline.kernels.formats.peft_adapter import load_peft_adapter, read_adapter_config
    from qlora_pipeline.kernels.lora import inject_lora

    cfg = read_adapter_config(adapter)
    inject_lora(model, list(cfg.target_modules), cfg.r, cfg.alpha, 0.0, cfg.use_rslora)
    load_peft_adapter(model, adapter)
    return model


def load_variant(name: str, ctx: StageContext, dtype: torch.dtype) -> Any:
    """Each model as it is served or trained (plain transformers for 16-bit folders, our loader for NF4), on the
    stage's device."""
    from qlora_pipeline.kernels.formats.bnb_loader import load_4bit_model
    from qlora_pipeline.stages.lm.lora16 import ADAPTER
    from qlora_pipeline.stages.lm.lora_plan import LOFTQ_ADAPTER

    device = torch.device(ctx.device)
    if name in ("base_16bit", "lora16"):
        model = load_16bit_model(ctx.parent_dir("prepare") / "model", dtype).to(device)
        return (with_adapter(model, ctx.parent_dir("train") / ADAPTER) if name == "lora16" else model).eval()
    if name == "merged":
        return load_16bit_model(ctx.parent_dir("merge") / "model", dtype).to(device)
    nf4 = load_4bit_model(ctx.parent_dir("quantize") / "model", compute_dtype=dtype)
    model = cast_parameters(nf4, dtype, device)
    if name == "nf4_adapter":
        model = with_adapter(model, ctx.parent_dir("train") / "adapter")
    elif name == "loftq_start":
        model = with_adapter(model, ctx.parent_dir("quantize") / LOFTQ_ADAPTER)
    return model.eval()


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, raw_text: bool = False) -> list[str]:
    """Greedy continuations; chat prompts are rendered already, raw text gets the tokenizer's own BOS as in
    training."""
    outs = []
    device = module_device(model)
    for p in prompts:
        ids = tokenizer(p, return_tensors="pt", add_special_tokens=raw_text).to(device)
        gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        outs.append(tokenizer.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return outs


def stage_table(ctx: StageContext) -> list[dict[str, Any]]:
    rows = []
    for name, manifest in ctx.parents.items():
        wall = manifest.timings.get("wall_s")
        rows.append({"stage": name, "device": manifest.device, "wall_s": wall, **manifest.memory})
    return rows


def gap_lines(metrics: dict[str, Any]) -> list[str]:
    """What 4 bits cost after the same fine-tuning, and where LoftQ's start stands, when the run measured them."""
    lines = []
    if (gap := metrics.get("qlora_minus_lora16")) is not None:
        lines += ["", f"QLoRA − 16-bit LoRA (same adapter, data order, steps and seed): **{gap:+.4f} nats**."]
    if (start := metrics.get("loftq_start_minus_16bit")) is not None:
        nf4 = metrics["nf4_loss_delta"]
        lines += ["", f"Before training: LoftQ's start is {start:+.4f} nats from the 16-bit base, plain NF4 {nf4:+.4f}"]
    return lines


def render_markdown(
    metrics: dict[str, Any], gens: list[dict[str, Any]], stages: list[dict[str, Any]], data: list[str]
) -> str:
    lines = [
        "# Evaluation report",
        "",
        f"Held-out test split, token-weighted over the labelled tokens (assistant replies; every token of plain "
        f"text); computed on {metrics['device']}.",
        "",
        *markdown_table(
            ("model", "loss", "perplexity"),
            [
                (LABELS[k], f"{v['loss']:.4f}", f"{v['perplexity']:.2f}")
                for k in MODELS
                if (v := metrics["models"].get(k)) is not None
            ],
        ),
        "",
        f"Test tokens scored: {metrics['test_tokens']}.",
        *gap_lines(metrics),
        "",
        "![training loss](loss_curve.png)",
        "",
        *data,
        "## Stages: wall time and peak memory",
        "",
        *markdown_table(
            ("stage", "device", "wall s", "peak RSS MiB", "peak GPU allocated MiB"),
            [
                (
                    r["stage"],
                    r.get("device", "cpu"),
                    f"{r.get('wall_s') or 0:.1f}",
                    f"{r.get('peak_rss_mb') or 0:.0f}",
                    "–" if (gpu := r.get("cuda_max_allocated_mb")) is None else f"{gpu:.0f}",
                )
                for r in stages
            ],
        ),
        "",
        "## Greedy generations",
        "",
    ]
    for g in gens:
        lines += [f"**Prompt:** {g['prompt']}", "", f"- reference: {g['reference']}"]
        for k, v in g["outputs"].items():
            lines.append(f"- {LABELS[k]}: {v}")
        lines.append("")
    return "\n".join(lines) + "\n"


def test_record(row: dict[str, Any]) -> Record:
    """A test row as prepare stored it: its own system prompt and earlier turns go into its generation prompt
    (prepare data from before those columns existed has neither)."""
    history = tuple((role, text) for role, text in json.loads(row.get("history") or "[]"))
    return Record(row["prompt"], row["response"], system=row.get("system") or None, history=history)


def body(ctx: StageContext) -> dict[str, Any]:
    import datasets
    from transformers import AutoTokenizer

    e = ctx.params.evaluate
    torch.manual_seed(0)
    prep = ctx.parent_dir("prepare")
    tok = AutoTokenizer.from_pretrained(prep / "model")
    pad = pad_token_id(tok)
    test = datasets.load_from_disk(str(prep / "data"))["test"]
    if e.max_examples is not None:
        test = test.select(range(min(e.max_examples, len(test))))
    rows = token_rows(test)
    n_gen = min(e.num_generations, len(test))
    system = ctx.params.data.system_prompt
    raw_text = ctx.parents["prepare"].metrics.get("data_format") == "text"
    if raw_text:  # plain text: the row's first tokens, continued
        prompts = [test[i]["prompt"] for i in range(n_gen)]
    else:
        prompts = [prompt_text(tok, test_record(test[i]), system) for i in range(n_gen)]
    dtype = default_compute_dtype(ctx.device)  # the 16-bit weights upcast exactly where the CPU lacks bf16
    results: dict[str, dict[str, float]] = {}
    outputs: dict[str, list[str]] = {}
    for name in present_models(ctx):
        model = load_variant(name, ctx, dtype)
        results[name] = heldout_loss(model, rows, e.batch_size, pad)
        if name not in ("base_nf4", "loftq_start") and n_gen:
            outputs[name] = generate(model, tok, prompts, e.max_new_tokens, raw_text)
        del model
        return_freed_heap()  # before the next variant loads (collects the dropped one first)
    gens = [
        {
            "prompt": test[i]["prompt"],
            "reference": test[i]["response"],
            "outputs": {k: v[i] for k, v in outputs.items()},
        }
        for i in range(n_gen)
    ]
    metrics = {
        "models": {
            k: {"loss": round(v["loss"], 6), "perplexity": round(v["perplexity"], 4)} for k, v in results.items()
        },
        "test_examples": len(rows),
        "device": ctx.device,
        "compute_dtype": dtype_name(dtype),
        "test_tokens": int(results["base_16bit"]["tokens"]),
        "nf4_loss_delta": round(results["base_nf4"]["loss"] - results["base_16bit"]["loss"], 6),
        "finetune_gain_vs_16bit": round(results["base_16bit"]["loss"] - results["nf4_adapter"]["loss"], 6),
        "merged_minus_adapter": round(results["merged"]["loss"] - results["nf4_adapter"]["loss"], 6),
    }
    if "lora16" in results:  # what 4 bits cost after the same fine-tuning
        metrics["qlora_minus_lora16"] = round(results["nf4_adapter"]["loss"] - results["lora16"]["loss"], 6)
    if "loftq_start" in results:  # how much of the NF4 error LoftQ's start removes before any training
        metrics["loftq_start_minus_16bit"] = round(results["loftq_start"]["loss"] - results["base_16bit"]["loss"], 6)
    plot = ctx.parent_dir("train") / "loss_curve.png"
    if plot.exists():
        shutil.copyfile(plot, ctx.out / "loss_curve.png")
    if (ctx.parent_dir("prepare") / "token_lengths.png").exists():
        shutil.copyfile(ctx.parent_dir("prepare") / "token_lengths.png", ctx.out / "token_lengths.png")
    md = render_markdown(metrics, gens, stage_table(ctx), data_section(ctx.parents["prepare"].metrics))
    (ctx.out / "report.md").write_text(md)
    images = {name: ctx.out / name for name in ("loss_curve.png", "token_lengths.png")}
    page = html_page(md, "Evaluation", images=images)
    (ctx.out / "report.html").write_text(page)
    (ctx.out / "generations.json").write_text(json.dumps(gens, indent=1, ensure_ascii=False))
    (ctx.out / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    for name in ("report.html", "report.md"):
        ctx.tracker.log_artifact(ctx.out / name)
    return metrics


def run(params: Params, parent_run_id: str | None = None) -> Manifest:
    return execute(STAGE, params, body, parent_run_id)
