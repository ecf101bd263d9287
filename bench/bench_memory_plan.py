"""The memory planner (`qlora plan`) against measurement, and its verdicts for the paper's models and Llama 3 70B.

    .venv/bin/python bench/bench_memory_plan.py [--out bench/results/memory_plan.json]

1. Predicted vs measured peak of a train step for tiny models of six families (tests/memory_probe.py): measured as
   the live torch tensor bytes at the step's peak on the CPU (every operator's outputs counted), error in %.
2. Predicted peak GPU memory for LLaMA 7B/13B/33B/65B and Llama 3 70B (config shapes only, nothing loaded) with
   the paper's setup (LoRA r=64 on every linear, batch 1, 512 tokens, paged AdamW, bf16 adapters) and with this
   project's defaults, whether each fits a 48 GB GPU, a 24 GB GPU and two 24 GB GPUs (train.nproc 2, FSDP2), and
   for the paper's setup the QLoRA paper's own figures next to ours (docs/memory.md says where they come from).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from checkout import ensure_importable  # noqa: E402

ensure_importable()
sys.path.insert(0, str(ROOT))


def llama(hidden: int, layers: int, heads: int, kv: int, ffn: int, vocab: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "intermediate_size": ffn,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
    }


MODELS = {
    "LLaMA 7B": llama(4096, 32, 32, 32, 11008, 32000),
    "LLaMA 13B": llama(5120, 40, 40, 40, 13824, 32000),
    "LLaMA 33B": llama(6656, 60, 52, 52, 17920, 32000),
    "LLaMA 65B": llama(8192, 80, 64, 64, 22016, 32000),
    "Llama 3 70B": llama(8192, 80, 64, 8, 28672, 128256),
}
PAPER_MB = {  # QLoRA paper, memory-breakdown figure (batch 1, 512 tokens): base model, adapters, optimizer, total
    "LLaMA 7B": (5046, 298, 1152, 6900),
    "LLaMA 13B": (8476, 450, 1800, 11300),
    "LLaMA 33B": (19302, 897.5, 3510, 24700),
    "LLaMA 65B": (37074, 1440, 5760, 45000),
}
PAPER_SETUP = "paper (r=64 all linears, batch 1 x 512, paged AdamW 32-bit, bf16 adapters)"
SETUPS = {
    "paper (r=64 all linears, batch 1 x 512, paged AdamW 32-bit, bf16 adapters)": {
        "train": {  # the paper checkpoints every layer: no recompute budget
            "lora_r": 64,
            "batch_size": 1,
            "adapter_dtype": "bfloat16",
            "optimizer_page_budget_mb": 512,
            "checkpoint_min_tokens": 0,
        },
        "data": {"max_length": 512},
    },
    "defaults (r=16, batch 8 x 256, paged AdamW 32-bit, fp32 adapters)": {},
}


def measured_table() -> list[dict]:
    from tests.memory_probe import PROBES, measure

    rows = []
    for probe in PROBES:
        peak, plan = measure(probe)
        rows.append(
            {
                "config": probe.label,
                "measured_mib": round(peak / 2**20, 2),
                "predicted_mib": round(plan.device_peak / 2**20, 2),
                "error_pct": round(100 * (plan.device_peak - peak) / peak, 1),
            }
        )
        print(
            f"| {probe.label} | {rows[-1]['measured_mib']} | {rows[-1]['predicted_mib']} | {rows[-1]['error_pct']:+} |"
        )
    return rows


def verdict(shape, t, gb: int) -> str:
    from qlora_pipeline.stages.contract.memory_fit import fitting_changes, usable_bytes
    from qlora_pipeline.stages.contract.memory_plan import plan_train

    if plan_train(shape, t).device_peak <= usable_bytes(gb * 10**9):
        return "fits"
    return f"no; {(fitting_changes(shape, t, gb * 10**9) or [('nothing fits', None)])[0][0]}"


def paper_columns(name: str, plan) -> dict:
    """Ours next to the paper's, in MB (10^6 bytes): the base (NF4 linears + 16-bit embeddings, head, norms), the
    adapters, the whole optimizer state, and the smallest GPU the planner accepts for the step (peak + CUDA context,
    over 90 %: what a GPU must have), against the paper's measured total."""
    from qlora_pipeline.stages.contract.memory_fit import CUDA_CONTEXT_BYTES

    base, adapters, optimizer, total = PAPER_MB[name]
    gpu = (plan.device_peak + CUDA_CONTEXT_BYTES) / 0.9
    ours = {
        "base": plan.base_nf4 + plan.base_16bit,
        "adapters": plan.lora,
        "optimizer": plan.host_optimizer or plan.optimizer,
        "gpu_needed": gpu,
    }
    paper = {"base": base, "adapters": adapters, "optimizer": optimizer, "gpu_needed": total}
    return {f"{k}_mb": [round(v / 1e6), paper[k]] for k, v in ours.items()}


def big_models() -> list[dict]:
    from dataclasses import replace

    from qlora_pipeline.stages.contract.memory_plan import ModelShape, plan_train, train_shape
    from qlora_pipeline.stages.contract.params import parse_params

    rows = []
    for setup, raw in SETUPS.items():
        params = parse_params(raw)
        for name, config in MODELS.items():
            shape, t = ModelShape.from_config(config), train_shape(params, config)
            plan = plan_train(shape, t)
            two = replace(t, ranks=2, sharded=True, batch_size=max(2, t.batch_size))  # an example for each rank
            row = {"setup": setup, "model": name, "predicted_gib": round(plan.device_peak / 2**30, 2)}
            row["nf4_base_gib"] = round(plan.base_nf4 / 2**30, 2)
            row["48GB"], row["24GB"] = verdict(shape, t, 48), verdict(shape, t, 24)
            row["2x24GB_fsdp_per_rank_gib"] = round(plan_train(shape, two).device_peak / 2**30, 2)
            row["2x24GB_fsdp"] = verdict(shape, two, 24)
            if setup == PAPER_SETUP and name in PAPER_MB:
                row["ours_vs_paper"] = paper_columns(name, plan)
            rows.append(row)
            print(f"| {setup[:8]} | {name} | {row['predicted_gib']} | {row['48GB']} | {row['24GB']} |", end=" ")
            print(f"{row['2x24GB_fsdp_per_rank_gib']} | {row['2x24GB_fsdp']} | {row.get('ours_vs_paper', '')} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "memory_plan.json")
    args = ap.parse_args()
    print("| config | measured MiB | predicted MiB | error % |\n|---|---|---|---|")
    measured = measured_table()
    print("\n| setup | model | predicted GiB | 48 GB | 24 GB | 2x24 GB per rank GiB | 2x24 GB | ours vs paper |")
    print("|---|---|---|---|---|---|---|---|")
    big = big_models()
    worst = max(abs(r["error_pct"]) for r in measured)
    print(f"\nworst error {worst}% over {len(measured)} configurations")
    args.out.write_text(json.dumps({"measured": measured, "models": big, "worst_error_pct": worst}, indent=1) + "\n")


if __name__ == "__main__":
    main()
