"""Quantize SmolLM2 with ours and with bitsandbytes in the same run; held-out loss of bf16 vs NF4.

    .venv/bin/python bench/bench_quantize.py [--artifacts artifacts]

Needs `qlora stage prepare` (and, for the loss rows, `qlora stage quantize`) to have run. Prints ratios
and writes bench/results/quantize.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def linear_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(model_dir / "model.safetensors")
    return {k: v for k, v in tensors.items() if k.endswith("proj.weight") and v.ndim == 2}


def time_ours(weights: dict[str, torch.Tensor], blocksize: int) -> float:
    from qlora_pipeline.kernels.nf4 import quantize_nf4

    t0 = time.perf_counter()
    for w in weights.values():
        quantize_nf4(w, blocksize=blocksize)
    return time.perf_counter() - t0


def time_bnb(weights: dict[str, torch.Tensor], blocksize: int) -> float | None:
    try:
        import bitsandbytes.functional as bf
    except ImportError:
        return None
    t0 = time.perf_counter()
    for w in weights.values():
        bf.quantize_4bit(w, quant_type="nf4", blocksize=blocksize, compress_statistics=True)
    return time.perf_counter() - t0


def heldout_losses(artifacts: Path, batch_size: int, device: torch.device) -> dict[str, float]:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_pipeline.kernels.formats.bnb_loader import load_4bit_model
    from qlora_pipeline.stages.lm.batching import token_rows
    from qlora_pipeline.stages.lm.lm_loss import heldout_loss

    prep = artifacts / "prepare"
    tok = AutoTokenizer.from_pretrained(prep / "model")
    test = datasets.load_from_disk(str(prep / "data"))["test"]
    rows = token_rows(test)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = {}
    bf16 = AutoModelForCausalLM.from_pretrained(prep / "model", dtype=torch.bfloat16).to(device)
    t0 = time.perf_counter()
    out["bf16"] = heldout_loss(bf16, rows, batch_size, pad)["loss"]
    out["bf16_eval_s"] = time.perf_counter() - t0
    del bf16
    qdir = artifacts / "quantize" / "model"
    if qdir.exists():
        nf4 = load_4bit_model(qdir, compute_dtype=torch.bfloat16).to(device)
        t0 = time.perf_counter()
        out["nf4_ours"] = heldout_loss(nf4, rows, batch_size, pad)["loss"]
        out["nf4_eval_s"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    ap.add_argument("--blocksize", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu", help="where the held-out losses are computed (quantizing is CPU)")
    args = ap.parse_args()
    from qlora_pipeline.stages.contract.device import resolve_device

    device = resolve_device(args.device)

    weights = linear_weights(args.artifacts / "prepare" / "model")
    n = sum(w.numel() for w in weights.values())
    ours = min(time_ours(weights, args.blocksize) for _ in range(args.repeats))
    bnb = [time_bnb(weights, args.blocksize) for _ in range(args.repeats)]
    bnb_s = min(b for b in bnb if b is not None) if any(b is not None for b in bnb) else None
    losses = heldout_losses(args.artifacts, args.batch_size, device)
    result = {
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
        "device": "cpu (quantize), " + str(device) + " (losses)",
        "n_weights": len(weights),
        "n_params": n,
        "ours_quantize_s": round(ours, 3),
        "bnb_quantize_s": None if bnb_s is None else round(bnb_s, 3),
        "time_ratio_ours_over_bnb": None if bnb_s is None else round(ours / bnb_s, 3),
        "heldout_loss": {k: round(v, 4) for k, v in losses.items()},
    }
    if "nf4_ours" in losses:
        result["nf4_loss_delta"] = round(losses["nf4_ours"] - losses["bf16"], 4)
    print(json.dumps(result, indent=1))
    out = ROOT / "bench" / "results" / "quantize.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
