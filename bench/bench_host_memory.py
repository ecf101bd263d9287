"""Each stage's peak host memory (RSS) as `qlora plan` predicts it, against the peak its manifest records.

    .venv/bin/python bench/bench_host_memory.py [--sizes smollm2 0.5B] [--out bench/results/host_memory.json]

Every stage runs as `qlora stage NAME` in a process of its own (as DVC runs it), so each peak is that stage's
alone: a tiny random Llama (~1 MB: what a stage costs whatever the model), the embedded SmolLM2-135M and a random
0.5B Llama (bf16 shards of at most 500 MB), on small data and few steps (the model, not the data, sets host
memory). Prediction: `stages/contract/host_plan.py` for a CPU node.
Takes about 15 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
from checkout import ensure_importable  # noqa: E402

ensure_importable()
sys.path.insert(0, str(ROOT))

STAGES = ("prepare", "quantize", "train", "merge", "evaluate", "export", "release")
LLAMA_05B = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16}


def model_source(size: str, work: Path) -> dict:
    if size == "smollm2":
        return {"source": "embedded"}
    if size == "tiny":  # ~1 MB of weights: what each stage costs whatever the model
        from tests.tiny import make_model_dir

        return {"source": "local", "path": str(make_model_dir(work / "model-tiny", "llama"))}
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.tiny import build_tokenizer

    path = work / "model-0.5B"
    tok = build_tokenizer()
    heads = LLAMA_05B["num_attention_heads"]  # the offline test tokenizer's vocabulary: the layers make the size
    config = LlamaConfig(vocab_size=len(tok), num_key_value_heads=heads // 4, tie_word_embeddings=True, **LLAMA_05B)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(path, max_shard_size="500MB")
    tok.save_pretrained(path)
    return {"source": "local", "path": str(path)}


def run_stages(size: str, work: Path) -> tuple[dict[str, float], dict[str, int], dict[str, str]]:
    from qlora_pipeline.stages.contract.host_plan import host_plan
    from qlora_pipeline.stages.contract.params import parse_params
    from qlora_pipeline.stages.lm.modelio import base_model_dir

    raw = {
        "model": model_source(size, work),
        "data": {"max_examples": 200},
        "train": {"max_steps": 3, "batch_size": 4},
        "evaluate": {"max_examples": 16, "num_generations": 1, "max_new_tokens": 4},
        "export": {"gguf_types": ["F16", "Q4_K_M"], "gptq_calibration_samples": 8},
        "release": {"allow_dirty": True, "publish_dir": str(work / "releases")},
        "tracking": {
            "mlflow": False,
            "artifacts_dir": str(work / "artifacts"),
            "metrics_dir": str(work / "metrics"),
            "dvc_commit": False,
        },
    }
    params_file = work / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    measured, allocators = {}, {}
    for stage in STAGES:
        cmd = [sys.executable, "-m", "qlora_pipeline.pipelines.cli", "stage", stage, "-p", str(params_file)]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        manifest = json.loads((work / "artifacts" / stage / "manifest.json").read_text())
        measured[stage] = manifest["memory"]["peak_rss_mb"] * 2**20
        allocators[stage] = manifest["libraries"].get("host_allocator", "unrecorded")
    params = parse_params(raw)
    model_dir = base_model_dir(params.model)
    predicted = host_plan(params, json.loads((model_dir / "config.json").read_text()), model_dir, "cpu")
    return measured, predicted, allocators


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", default=["tiny", "smollm2", "0.5B"])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "host_memory.json")
    args = ap.parse_args()
    rows = []
    print("| model | stage | measured MiB | predicted MiB | error % | allocator |\n|---|---|---|---|---|---|")
    for size in args.sizes:
        with tempfile.TemporaryDirectory(prefix="host-mem-") as tmp:
            measured, predicted, allocators = run_stages(size, Path(tmp))
        for stage in STAGES:
            m, p = measured[stage], predicted[stage]
            rows.append(
                {
                    "model": size,
                    "stage": stage,
                    "measured_mib": round(m / 2**20),
                    "predicted_mib": round(p / 2**20),
                    "error_pct": round(100 * (p - m) / m, 1),
                    "host_allocator": allocators[stage],
                }
            )
            r = rows[-1]
            cells = (size, stage, r["measured_mib"], r["predicted_mib"], f"{r['error_pct']:+}", r["host_allocator"])
            print("| " + " | ".join(map(str, cells)) + " |", flush=True)
    worst = max(abs(r["error_pct"]) for r in rows)
    print(f"\nworst error {worst}% over {len(rows)} stage runs")
    args.out.write_text(json.dumps({"rows": rows, "worst_error_pct": worst}, indent=1) + "\n")


if __name__ == "__main__":
    main()
