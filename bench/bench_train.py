"""QLoRA training step time, tokens/s, peak memory and held-out loss: ours vs transformers+bitsandbytes+peft.

    .venv/bin/python bench/bench_train.py [--steps 20] [--same-batches]

Same model (SmolLM2-135M-Instruct bf16 → NF4+DQ), same data (artifacts/prepare), batch 8, seq ≤ 256,
LoRA r=16 α=32 dropout 0.05 on all 7 projections, gradient checkpointing, lr 2e-4 constant, clip 0.3.
Each configuration runs in its own subprocess so peak RSS is its own; all run in this one invocation.
By default each stack batches as it does out of the box (bnb+peft: random batches padded to the longest
row, as HF Trainer; ours: length-grouped); `--same-batches` feeds both the identical batches.
Writes bench/results/train.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_batches(n_rows: int, batch_size: int, seed: int, steps: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    out: list[list[int]] = []
    while len(out) < steps:
        order = list(range(n_rows))
        rng.shuffle(order)
        out.extend(order[i : i + batch_size] for i in range(0, n_rows - batch_size + 1, batch_size))
    return out[:steps]


def load_rows(artifacts: Path, split: str) -> list[tuple[list[int], list[int]]]:
    import datasets

    ds = datasets.load_from_disk(str(artifacts / "prepare" / "data"))[split]
    return list(zip(ds["input_ids"], ds["labels"], strict=True))


def worker(args: argparse.Namespace) -> dict:
    """One configuration, in this process: train `steps` steps, then held-out loss on the test split."""
    import torch

    from stages.common.batching import batch_stream, collate
    from stages.common.lm_loss import heldout_loss

    torch.manual_seed(0)
    rows = load_rows(args.artifacts, "train")
    test = load_rows(args.artifacts, "test")
    pad = 2
    if args.batching == "grouped":
        stream = batch_stream([len(r[0]) for r in rows], 8, seed=0)
        order = [next(stream) for _ in range(args.steps)]
    else:
        order = random_batches(len(rows), 8, 0, args.steps)
    if args.stack == "ours":
        model, trainable, step_fn = _ours(args)
    else:
        model, trainable, step_fn = _bnb(args)
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times, tokens, losses = [], [], []
    for idx in order:
        batch = collate([rows[i] for i in idx], pad)
        t0 = time.perf_counter()
        loss = step_fn(batch)
        times.append(time.perf_counter() - t0)
        tokens.append(batch.n_tokens)
        losses.append(loss)
    timed = slice(2, None) if len(times) > 4 else slice(None)
    held = heldout_loss(model, test, 8, pad)["loss"] if args.eval else None
    return {
        "stack": args.stack,
        "optimizer": args.optimizer,
        "batching": args.batching,
        "steps": len(times),
        "median_step_s": statistics.median(times[timed]),
        "tokens_per_s": sum(tokens[timed]) / sum(times[timed]),
        "padded_tokens_per_step": statistics.mean(len(idx) * max(len(rows[i][0]) for i in idx) for idx in order),
        "first_loss": losses[0],
        "last5_loss": statistics.mean(losses[-5:]),
        "heldout_loss": held,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_load_mb": rss_model,
        "trainable": sum(p.numel() for p in trainable),
    }


def _ours(args: argparse.Namespace):
    import torch

    from stages.common.lm_loss import summed_loss
    from stages.common.params import TrainParams
    from stages.train import build_model, device_and_dtype, make_optimizer, set_checkpointing

    t = TrainParams(optimizer=args.optimizer, lora_r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS)
    device, dtype = device_and_dtype(t)
    model, trainable = build_model(args.artifacts / "quantize" / "model", t, device, dtype)
    opt = make_optimizer(trainable, t)
    model.train()

    def step(batch) -> float:
        set_checkpointing(model, batch.input_ids.numel() >= t.checkpoint_min_tokens)  # as stages/train.py does
        total, n = summed_loss(model, batch)
        loss = total / max(n, 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return model, trainable, step


def _bnb(args: argparse.Namespace):
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qc = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        args.artifacts / "prepare" / "model", quantization_config=qc, dtype=torch.bfloat16, device_map="cpu"
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM")
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    cls = bnb.optim.PagedAdamW8bit if args.optimizer.endswith("8bit") else bnb.optim.PagedAdamW32bit
    opt = cls(trainable, lr=2e-4, weight_decay=0.0)
    model.train()

    def step(batch) -> float:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss)

    return model, trainable, step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--same-batches", action="store_true")
    ap.add_argument("--no-eval", dest="eval", action="store_false")
    ap.add_argument("--optimizers", default="32bit,8bit")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--stack", default="ours")
    ap.add_argument("--optimizer", default="paged_adamw_32bit")
    ap.add_argument("--batching", default="grouped")
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return
    results = []
    for bits in args.optimizers.split(","):
        for stack in ("bnb+peft", "ours"):
            batching = "random" if (stack == "bnb+peft" or args.same_batches) else "grouped"
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                "--stack",
                stack,
                "--optimizer",
                f"paged_adamw_{bits}",
                "--batching",
                batching,
                "--steps",
                str(args.steps),
                "--artifacts",
                str(args.artifacts),
            ]
            if not args.eval:
                cmd.append("--no-eval")
            print(f"running {stack} paged_adamw_{bits} ({batching} batches, {args.steps} steps) ...", flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(proc.stderr[-3000:])
                raise SystemExit(f"{stack} failed")
            res = json.loads(line[len("RESULT ") :])
            print(json.dumps(res), flush=True)
            results.append(res)
    ratios = {}
    for bits in args.optimizers.split(","):
        base = next(r for r in results if r["stack"] == "bnb+peft" and r["optimizer"].endswith(bits))
        ours = next(r for r in results if r["stack"] == "ours" and r["optimizer"].endswith(bits))
        ratios[f"paged_adamw_{bits}"] = {
            "step_time_ratio_ours_over_bnb": round(ours["median_step_s"] / base["median_step_s"], 3),
            "tokens_per_s_ratio_ours_over_bnb": round(ours["tokens_per_s"] / base["tokens_per_s"], 3),
            "peak_rss_ratio_ours_over_bnb": round(ours["peak_rss_mb"] / base["peak_rss_mb"], 3),
            "heldout_loss_bnb": base["heldout_loss"],
            "heldout_loss_ours": ours["heldout_loss"],
        }
    summary = {"steps": args.steps, "same_batches": args.same_batches, "results": results, "ratios": ratios}
    print(json.dumps(ratios, indent=1))
    out = ROOT / "bench" / "results" / ("train_same_batches.json" if args.same_batches else "train.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
