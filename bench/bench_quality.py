"""What 4 bits cost against 16-bit LoRA, and what LoftQ wins back: one table from one run on the embedded default.

    .venv/bin/python bench/bench_quality.py [--loftq-iters 5] [--out bench/results/quality.json]

Runs prepare → quantize → train → merge → evaluate twice in this one invocation, with params.yaml otherwise
unchanged (tracking off, artifacts under bench/.quality/<run>/):

- `plain`: `quantize.loftq_iters: 0`, `train.lora16_baseline: true` (the 16-bit LoRA baseline trains beside QLoRA,
  same adapter, data order, steps and seed);
- `loftq`: `quantize.loftq_iters: N`, no baseline (the baseline does not depend on quantize: the plain run's is it).

Prints the held-out test loss of every model and the gaps QLoRA − LoRA with and without LoftQ; writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import yaml
from checkout import ensure_importable

ROOT = Path(__file__).resolve().parents[1]
ensure_importable()


def run(name: str, overrides: dict[str, dict[str, Any]], work: Path) -> dict[str, Any]:
    """The five stages on params.yaml + overrides, artifacts under work/name; each stage's metrics."""
    from qlora_pipeline.stages import evaluate, merge, prepare, quantize, train
    from qlora_pipeline.stages.contract.params import parse_params

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["tracking"] |= {
        "mlflow": False,
        "dvc_commit": False,
        "artifacts_dir": str(work / name / "artifacts"),
        "metrics_dir": str(work / name / "metrics"),
    }
    for section, values in overrides.items():
        raw[section] |= values
    params = parse_params(raw)
    out: dict[str, Any] = {}
    for stage in (prepare, quantize, train, merge, evaluate):
        t0 = time.perf_counter()
        out[stage.STAGE] = stage.run(params).metrics
        print(f"{name}: {stage.STAGE} {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def table(plain: dict[str, Any], loftq: dict[str, Any]) -> dict[str, Any]:
    a, b = plain["evaluate"]["models"], loftq["evaluate"]["models"]
    rows = {
        "16-bit base": a["base_16bit"],
        "NF4 base (plain)": a["base_nf4"],
        "NF4 base (LoftQ's Q alone)": b["base_nf4"],
        "16-bit LoRA (baseline)": a["lora16"],
        "QLoRA": a["nf4_adapter"],
        "QLoRA with LoftQ init, step 0": b["loftq_start"],
        "QLoRA with LoftQ init, trained": b["nf4_adapter"],
        "merged QLoRA (into the original 16-bit weights)": a["merged"],
        "merged QLoRA with LoftQ (into its dequantized NF4 base)": b["merged"],
    }
    lora = a["lora16"]["loss"]
    return {
        "rows": rows,
        "gap_qlora_minus_lora16": a["nf4_adapter"]["loss"] - lora,
        "gap_qlora_loftq_minus_lora16": b["nf4_adapter"]["loss"] - lora,
        "loftq_quantize": loftq["quantize"]["loftq"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loftq-iters", type=int, default=5)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / ".quality")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quality.json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    plain = run("plain", {"quantize": {"loftq_iters": 0}, "train": {"lora16_baseline": True}}, args.work)
    with_loftq = {"quantize": {"loftq_iters": args.loftq_iters}, "train": {"lora16_baseline": False}}
    loftq = run("loftq", with_loftq, args.work)
    result = table(plain, loftq)
    steps = plain["train"]["steps"]
    print(f"\n| model (held-out test split, {steps} training steps) | loss | perplexity |\n|---|---|---|")
    for name, v in result["rows"].items():
        print(f"| {name} | {v['loss']:.4f} | {v['perplexity']:.2f} |")
    print(f"\nQLoRA − 16-bit LoRA: {result['gap_qlora_minus_lora16']:+.4f} nats")
    print(f"QLoRA with LoftQ init − 16-bit LoRA: {result['gap_qlora_loftq_minus_lora16']:+.4f} nats")
    q = result["loftq_quantize"]
    print(
        f"step-0 weight error over {q['projections']} projections: plain NF4 {q['mean_rel_error_plain_nf4']:.4f}, "
        f"LoftQ ({q['iters']} iterations) {q['mean_rel_error_loftq']:.4f} (mean relative Frobenius)"
    )
    report = {
        "loftq_iters": args.loftq_iters,
        "steps": steps,
        "seconds": round(time.perf_counter() - t0, 1),
        **result,
        "train": {"plain": plain["train"], "loftq": loftq["train"]},
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
