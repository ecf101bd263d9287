"""evaluate: held-out loss and perplexity of the 16-bit base, the NF4 base, NF4 + adapter and the merged
model on the test split, greedy generations side by side, and a report a reviewer opens without Python.

Output `artifacts/evaluate/`: `metrics.json` (also the DVC metrics), `report.md`, `report.html` (plots
embedded), `generations.json`, `loss_curve.png`.
"""

from __future__ import annotations

import base64
import gc
import html
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from kernels.lora import module_device
from stages.common.dataio import Record
from stages.common.formatting import prompt_text
from stages.common.lm_loss import heldout_loss
from stages.common.modelio import cast_parameters, pad_token_id
from stages.common.params import Params
from stages.common.stage import StageContext, execute, stage_main

STAGE = "evaluate"
MODELS = ("base_16bit", "base_nf4", "nf4_adapter", "merged")
LABELS = {
    "base_16bit": "16-bit base",
    "base_nf4": "NF4 base",
    "nf4_adapter": "NF4 base + adapter",
    "merged": "merged 16-bit",
}


def load_variant(name: str, ctx: StageContext, dtype: torch.dtype) -> Any:
    """Each model as it is served or trained (plain transformers for 16-bit folders, our loader for NF4), on the
    stage's device."""
    from transformers import AutoModelForCausalLM

    from kernels.checkpoint4bit import load_4bit_model

    device = torch.device(ctx.device)
    if name == "base_16bit":
        return AutoModelForCausalLM.from_pretrained(ctx.parent_dir("prepare") / "model", dtype=dtype).to(device)
    if name == "merged":
        return AutoModelForCausalLM.from_pretrained(ctx.parent_dir("merge") / "model", dtype=dtype).to(device)
    nf4 = load_4bit_model(ctx.parent_dir("quantize") / "model", compute_dtype=dtype)
    model = cast_parameters(nf4, dtype, device)
    if name == "nf4_adapter":
        from kernels.lora import inject_lora
        from kernels.peft_format import load_peft_adapter, read_adapter_config

        adapter = ctx.parent_dir("train") / "adapter"
        cfg = read_adapter_config(adapter)
        inject_lora(model, list(cfg.target_modules), cfg.r, cfg.alpha, 0.0, cfg.use_rslora)
        load_peft_adapter(model, adapter)
    return model.eval()


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int) -> list[str]:
    outs = []
    device = module_device(model)
    for p in prompts:
        ids = tokenizer(p, return_tensors="pt", add_special_tokens=False).to(device)
        gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        outs.append(tokenizer.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return outs


def stage_table(ctx: StageContext) -> list[dict[str, Any]]:
    rows = []
    for name, manifest in ctx.parents.items():
        wall = manifest.timings.get("wall_s")
        rows.append({"stage": name, "device": manifest.device, "wall_s": wall, **manifest.memory})
    return rows


def render_markdown(metrics: dict[str, Any], gens: list[dict[str, Any]], stages: list[dict[str, Any]]) -> str:
    lines = [
        "# Evaluation report",
        "",
        f"Held-out test split, token-weighted over reply tokens; computed on {metrics['device']}.",
        "",
        "| model | loss | perplexity |",
        "|---|---|---|",
    ]
    for k in MODELS:
        if k in metrics["models"]:
            v = metrics["models"][k]
            lines.append(f"| {LABELS[k]} | {v['loss']:.4f} | {v['perplexity']:.2f} |")
    lines += [
        "",
        f"Test tokens scored: {metrics['test_tokens']}.",
        "",
        "![training loss](loss_curve.png)",
        "",
        "## Stages: wall time and peak memory",
        "",
        "| stage | device | wall s | peak RSS MiB | peak GPU allocated MiB |",
        "|---|---|---|---|---|",
    ]
    for r in stages:
        gpu = r.get("cuda_max_allocated_mb")
        lines.append(
            f"| {r['stage']} | {r.get('device', 'cpu')} | {r.get('wall_s') or 0:.1f} | {r.get('peak_rss_mb') or 0:.0f} "
            f"| {'–' if gpu is None else f'{gpu:.0f}'} |"
        )
    lines += ["", "## Greedy generations", ""]
    for g in gens:
        lines += [f"**Prompt:** {g['prompt']}", "", f"- reference: {g['reference']}"]
        for k, v in g["outputs"].items():
            lines.append(f"- {LABELS[k]}: {v}")
        lines.append("")
    return "\n".join(lines) + "\n"


def render_html(markdown_text: str, plot: Path | None) -> str:
    """A self-contained page (plot inlined) so a reviewer can open it from a bundle with no server."""
    body = []
    in_table = False
    for line in markdown_text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                body.append("<table>")
                in_table = True
            body.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("!["):
            if plot is not None and plot.exists():
                data = base64.b64encode(plot.read_bytes()).decode()
                body.append(f'<img alt="training loss" src="data:image/png;base64,{data}">')
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("- "):
            body.append(f"<li>{html.escape(line[2:])}</li>")
        elif line.strip():
            body.append(f"<p>{html.escape(line).replace('**', '')}</p>")
    if in_table:
        body.append("</table>")
    style = (
        "body{font-family:sans-serif;max-width:60rem;margin:2rem auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.3rem .6rem}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Evaluation</title><style>{style}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )


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
    rows = list(zip(test["input_ids"], test["labels"], strict=True))
    n_gen = min(e.num_generations, len(test))
    system = ctx.params.data.system_prompt
    prompts = [prompt_text(tok, Record(test[i]["prompt"], test[i]["response"]), system) for i in range(n_gen)]
    dtype = torch.bfloat16
    results: dict[str, dict[str, float]] = {}
    outputs: dict[str, list[str]] = {}
    for name in MODELS:
        model = load_variant(name, ctx, dtype)
        results[name] = heldout_loss(model, rows, e.batch_size, pad)
        if name != "base_nf4" and n_gen:
            outputs[name] = generate(model, tok, prompts, e.max_new_tokens)
        del model
        gc.collect()
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
        "test_tokens": int(results["base_16bit"]["tokens"]),
        "nf4_loss_delta": round(results["base_nf4"]["loss"] - results["base_16bit"]["loss"], 6),
        "finetune_gain_vs_16bit": round(results["base_16bit"]["loss"] - results["nf4_adapter"]["loss"], 6),
        "merged_minus_adapter": round(results["merged"]["loss"] - results["nf4_adapter"]["loss"], 6),
    }
    plot = ctx.parent_dir("train") / "loss_curve.png"
    if plot.exists():
        shutil.copyfile(plot, ctx.out / "loss_curve.png")
    md = render_markdown(metrics, gens, stage_table(ctx))
    (ctx.out / "report.md").write_text(md)
    (ctx.out / "report.html").write_text(render_html(md, ctx.out / "loss_curve.png"))
    (ctx.out / "generations.json").write_text(json.dumps(gens, indent=1, ensure_ascii=False))
    (ctx.out / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    for name in ("report.html", "report.md"):
        ctx.tracker.log_artifact(ctx.out / name)
    return metrics


def run(params: Params) -> Any:
    return execute(STAGE, params, body)


if __name__ == "__main__":
    raise SystemExit(stage_main(STAGE, run))
