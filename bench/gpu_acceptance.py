"""One call on a GPU node proves the pipeline there: kernels, the compute stages, and both benches vs bnb+peft.

    python bench/gpu_acceptance.py [--device cuda] [--work DIR] [--reference bench/results/gpu-acceptance-cpu.json]
                                   [--only kernels,pipeline,...] [--results DIR] [--bench-artifacts DIR]

Run it through bench/gpu_acceptance.sh, which also installs carried wheels on an air-gapped node. The steps, in
order (`--only` picks some; a step that fails is reported and the next one still runs):

1. kernels (bench/kernel_checks.py): Triton NF4+DQ dequant to fp32/bf16/fp16 and the 8-bit AdamW step, bit for
   bit against the torch references run on the CPU; paged AdamW under a budget a third of its state;
2. the pipeline's compute stages on the embedded default with `runtime.device` set (prepare → quantize →
   train 60 steps → merge → evaluate → export GPTQ), each stage's wall time and GPU memory peaks; the held-out
   losses are compared with the same run on the CPU (`--reference`, written by `--device cpu`). With the default
   LoRA dropout: the masks are a function of seeds drawn on the CPU (kernels/dropout.py), the same bits on every
   device, so the two runs differ by the devices' rounding, not by their random streams;
3. bench/bench_train.py on the device (`bench-smollm2`, `bench-8b`), ours vs transformers+bitsandbytes+peft
   (bf16 autocast, SDPA attention), ours on bnb's batches and on its own batchings, on SmolLM2 and on a random
   model of Llama-3-8B layer shapes cut to a few blocks: tokens/s, peak memory. The 8B-shaped bench needs only
   prepare's tokenizer and data (`--bench-artifacts`), not SmolLM2's weights;
4. bench/bench_dequant.py: 4096x14336 NF4+DQ → bf16 with the L2 flushed, µs, TB/s and % of the measured copy
   bandwidth, the 1-D and the 2-D tile Triton kernels;
5. bench/profile_step.py on the device (`profile`): one SmolLM2 step of each stack, its unprofiled wall time, top
   ops by self device time and top Python functions by own time (cProfile: where the host time goes).

`--device cpu` is the dry run of every step at CPU sizes (Triton through its interpreter, 3-step benches, a one-block
8B-shaped model); it writes the CPU reference losses for step 2. Results: gpu-*.json (GPU) or gpu-*-cpu.json (dry
run) in bench/results or `--results`; a run of some steps names its report after them. Exit 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
from checkout import ensure_importable  # noqa: E402

ensure_importable()
RESULTS = ROOT / "bench" / "results"
CPU_REFERENCE = RESULTS / "gpu-acceptance-cpu.json"
# bf16 rounding of the same computation on another device: measured differences on SmolLM2 stay well under this.
UNTRAINED_TOL = 0.02
TRAINED_TOL = 0.05
T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {msg}", flush=True)


def sub(cmd: list[str], env: dict[str, str] | None = None) -> int:
    say("$ " + " ".join(cmd))
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}).returncode


def pipeline_params(device: str, work: Path) -> dict[str, Any]:
    return {
        "runtime": {"device": device},
        "train": {"lora16_baseline": False},
        "export": {"gguf_types": [], "gptq": True, "score_gguf": False},
        "release": {"allow_dirty": True},
        "tracking": {
            "mlflow": False,
            "dvc_commit": False,
            "artifacts_dir": str(work / "artifacts"),
            "metrics_dir": str(work / "metrics"),
        },
    }


def run_pipeline(device: str, work: Path) -> dict[str, Any]:
    """prepare → quantize → train → merge → evaluate → export (GPTQ) in this process; losses, times, peaks."""
    from qlora_pipeline.stages import evaluate, export, merge, prepare, quantize, train
    from qlora_pipeline.stages.contract.params import parse_params

    params = parse_params(pipeline_params(device, work))
    stages: dict[str, Any] = {}
    for stage in (prepare, quantize, train, merge, evaluate, export):
        say(f"stage {stage.STAGE} on {params.runtime.device}")
        m = stage.run(params)
        stages[stage.STAGE] = {"device": m.device, "wall_s": m.timings["wall_s"], **m.memory}
    t = json.loads((work / "metrics" / "train.json").read_text())["metrics"]
    e = json.loads((work / "metrics" / "evaluate.json").read_text())["metrics"]
    x = json.loads((work / "metrics" / "export.json").read_text())["metrics"]
    losses = {
        "val_nf4_base": t["val_loss_before"],
        "val_after_training": t["val_loss_after"],
        **{f"test_{k}": v["loss"] for k, v in e["models"].items()},
        "test_gptq": x["formats"]["gptq"]["loss"],
        "test_rtn": x["formats"]["rtn"]["loss"],
    }
    return {"losses": losses, "stages": stages, "train_tokens_per_s": t["tokens_per_s"], "steps": t["steps"]}


UNTRAINED = ("val_nf4_base", "test_base_16bit", "test_base_nf4")


def compare(losses: dict[str, float], reference: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    for key, ref in reference.items():
        got = losses.get(key)
        tol = UNTRAINED_TOL if key in UNTRAINED else TRAINED_TOL
        ok = got is not None and abs(got - ref) <= tol
        rows.append({"loss": key, "device": got, "cpu": ref, "delta": None if got is None else got - ref, "ok": ok})
    return rows


STEPS = ("kernels", "pipeline", "bench-smollm2", "bench-8b", "dequant", "profile")


def run_steps(args: argparse.Namespace, device, report: dict[str, Any], failures: list[str]) -> None:
    """Each selected step in order; a step that raises is recorded as a failure and the next one still runs."""
    gpu = device.type == "cuda"
    res = args.results
    suffix = "" if gpu else "-cpu"
    env = {"PYTHONWARNINGS": "ignore"}
    bench = [sys.executable, "bench/bench_train.py", "--device", str(device), "--optimizers", "32bit"]
    bench += ["--all-batchings", *(["--steps", "20"] if gpu else ["--steps", "3", "--eval-rows", "8"])]
    bench_models = {"bench-smollm2": ("smollm2", [], args.work / "artifacts")}
    bench_models["bench-8b"] = ("llama3-8b-shape", ["--layers", "4" if gpu else "1"], args.bench_artifacts)
    for step in args.only:
        say(f"== step {step}")
        try:
            if step == "kernels":
                out = res / f"gpu-kernels{suffix}.json"
                if sub([sys.executable, "bench/kernel_checks.py", "--device", str(device), "--out", str(out)]) != 0:
                    failures.append("kernel checks")
                report["kernels"] = json.loads(out.read_text()) if out.exists() else None
            elif step == "pipeline":
                pipe = run_pipeline(str(device), args.work)
                report["pipeline"] = pipe
                if gpu and args.reference.exists():
                    reference = json.loads(args.reference.read_text())["pipeline"]["losses"]
                    pipe["vs_cpu"] = compare(pipe["losses"], reference)
                    failures += [f"loss {r['loss']} differs from the CPU run" for r in pipe["vs_cpu"] if not r["ok"]]
                elif gpu:
                    failures.append(f"no CPU reference at {args.reference} (run with --device cpu first)")
            elif step in bench_models:
                model, extra, artifacts = bench_models[step]
                out = res / f"gpu-train-{model}{suffix}.json"
                cmd = [*bench, "--artifacts", str(artifacts), "--model", model, *extra, "--out", str(out)]
                if sub(cmd, env) != 0:
                    failures.append(f"train bench {model}")
                report.setdefault("train_bench", {})[model] = (
                    json.loads(out.read_text())["ratios"] if out.exists() else None
                )
            elif step == "dequant":
                out = res / f"gpu-dequant{suffix}.json"
                if sub([sys.executable, "bench/bench_dequant.py", "--device", str(device), "--out", str(out)]) != 0:
                    failures.append("dequant bench")
                report["dequant"] = json.loads(out.read_text())["results"] if out.exists() else None
            elif step == "profile":
                out = res / f"gpu-profile_step{suffix}.txt"
                cmd = [sys.executable, "bench/profile_step.py", "--device", str(device), "--rows", "25"]
                if sub([*cmd, "--artifacts", str(args.work / "artifacts"), "--out", str(out)], env) != 0:
                    failures.append("profile")
        except Exception as exc:  # a broken step must not hide the next steps' numbers
            import traceback

            traceback.print_exc()
            failures.append(f"{step}: {type(exc).__name__}: {exc}"[:300])
        say(f"== step {step} done")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "qlora-acceptance")
    ap.add_argument("--reference", type=Path, default=CPU_REFERENCE)
    ap.add_argument("--only", default=",".join(STEPS), help=f"comma-separated steps, in order: {','.join(STEPS)}")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder for the results (default bench/results)")
    ap.add_argument(
        "--bench-artifacts",
        type=Path,
        default=None,
        help="artifacts folder whose prepare/ holds the tokenizer and data for the 8B-shaped bench (default: the "
        "pipeline step's)",
    )
    args = ap.parse_args()
    args.only = [s for s in args.only.split(",") if s]
    if unknown := set(args.only) - set(STEPS):
        ap.error(f"unknown steps {sorted(unknown)}; choose from {','.join(STEPS)}")
    args.bench_artifacts = args.bench_artifacts or args.work / "artifacts"
    args.results.mkdir(parents=True, exist_ok=True)
    import torch

    from qlora_pipeline.stages.contract.device import describe, resolve_device

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    say(f"torch {torch.__version__}, device {describe(device)}, python {sys.version.split()[0]}")
    report: dict[str, Any] = {"device": describe(device), "torch": torch.__version__, "steps": args.only}
    failures: list[str] = []
    run_steps(args, device, report, failures)
    report["seconds"] = round(time.perf_counter() - T0, 1)
    report["failures"] = failures
    tag = "" if args.only == list(STEPS) else "-" + "-".join(args.only)
    out = args.results / (f"gpu-acceptance{tag}.json" if gpu else f"gpu-acceptance{tag}-cpu.json")
    out.write_text(json.dumps(report, indent=1) + "\n")
    print_summary(report)
    say(f"wrote {out}; {'all checks passed' if not failures else 'FAILED: ' + '; '.join(failures)}")
    return 0 if not failures else 1


def print_summary(report: dict[str, Any]) -> None:
    print(f"\n== acceptance on {report['device']} ==")
    if report.get("kernels"):
        ok = sum(c["ok"] for c in report["kernels"]["checks"])
        print(f"kernels: {ok}/{len(report['kernels']['checks'])} bit-exact / paging checks pass")
    pipe = report.get("pipeline") or {"stages": {}, "losses": {}}
    print("| stage | device | wall s | peak GPU allocated MiB | peak RSS MiB |\n|---|---|---|---|---|")
    for name, s in pipe["stages"].items():
        gpu = s.get("cuda_max_allocated_mb")
        gpu_text = "–" if gpu is None else f"{gpu:.0f}"
        print(f"| {name} | {s['device']} | {s['wall_s']:.1f} | {gpu_text} | {s['peak_rss_mb']:.0f} |")
    print("| held-out loss | this device | CPU reference | Δ |\n|---|---|---|---|")
    for r in pipe.get("vs_cpu") or [
        {"loss": k, "device": v, "cpu": None, "delta": None} for k, v in pipe["losses"].items()
    ]:
        cpu = "–" if r["cpu"] is None else f"{r['cpu']:.4f}"
        delta = "–" if r["delta"] is None else f"{r['delta']:+.4f}"
        print(f"| {r['loss']} | {r['device']:.4f} | {cpu} | {delta} |")
    print("| model | tokens/s ours ÷ bnb+peft | peak memory ours ÷ bnb+peft | held-out loss bnb / ours |")
    print("|---|---|---|---|")
    for model, ratios in (report.get("train_bench") or {}).items():
        if not ratios:
            continue
        both = ratios["paged_adamw_32bit"]
        for tag in ("random", "grouped", "packed"):
            r = both.get(f"ours_{tag}")
            if r is None:
                continue
            mem = r.get("peak_gpu_allocated_ratio_ours_over_bnb") or r.get("peak_rss_ratio_ours_over_bnb")
            losses = f"{both['heldout_loss_bnb']:.4f} / {r['heldout_loss_ours']:.4f}"
            print(f"| {model} ({tag}) | {r['tokens_per_s_ratio_ours_over_bnb']} | {mem} | {losses} |")
    for name, r in (report.get("dequant") or {}).items():
        share = f", {r['percent_of_copy_bandwidth']:.0f}% of copy" if "percent_of_copy_bandwidth" in r else ""
        exact = r["bit_exact_vs_reference"]
        print(f"dequant {name}: {r['us']:.1f} us, {r['GB_per_s']:.1f} GB/s{share}, bit-exact {exact}")


if __name__ == "__main__":
    raise SystemExit(main())
