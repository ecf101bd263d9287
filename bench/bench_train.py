"""QLoRA training step time, tokens/s, peak memory and held-out loss: ours (packed and length-grouped batches) vs
transformers+bitsandbytes+peft.

    .venv/bin/python bench/bench_train.py [--steps 20 | --tokens N] [--same-batches] [--device auto|cpu|cuda]
                                          [--model smollm2|llama3-8b-shape] [--layers 2] [--repeats 1] [--out FILE]

Same model, same data (artifacts/prepare), batch 8, seq ≤ 256, LoRA r=16 α=32 dropout 0.05 on all 7
projections, gradient checkpointing, lr 2e-4 constant, clip 0.3. `smollm2` is SmolLM2-135M-Instruct as prepare
and quantize left it; `llama3-8b-shape` is a random model with Llama-3-8B's layer shapes (hidden 4096, FFN 14336,
32 heads / 8 KV heads, vocab 128256, untied head) cut to `--layers` decoder blocks, quantized by our NF4 code.
Each configuration runs in its own subprocess so its peak memory is its own (peak RSS on the CPU,
`torch.cuda.max_memory_allocated` on a GPU); all run in this one invocation. The bnb+peft baseline runs under
bf16 autocast, on the CPU as on a GPU, as HF Trainer with `bf16=True` runs it (`--no-bnb-autocast` turns that off);
`--bnb-dtype float32` loads it in fp32 with fp32 compute and no autocast, the fastest it runs on a CPU without bf16
dot products (AVX2), where ours computes in fp32 too (`--compute-dtype` sets ours, default `auto`: kernels/dtypes.py).
By default each stack batches as it does out of the box (bnb+peft: random batches padded to the longest
row, as HF Trainer) and ours runs twice, with `train.packing` off (length-grouped batches of 8 examples) and on
(random batches of 8 examples packed into balanced rows of at most 256 tokens);
`--same-batches` feeds bnb+peft and ours the identical random batches instead, ours twice: padded as bnb+peft pads
them (`random`) and each batch's examples laid end to end in rows of at most 256 tokens, as `train.packing` lays out
a batch (`random_packed`: the same examples, tokens and loss, no padding computed); `--all-batchings` runs ours on
those batches and on its own two batchings beside one bnb+peft run (ratios `ours_random`, `_random_packed`,
`_grouped`, `_packed`).
`--tokens N` trains every
configuration on the same N real (not padding) tokens, so the held-out losses compare at equal data.
Ours runs on the C allocator the CLI runs it on (mimalloc where installed and probed: stages/contract/host_allocator.py;
`--ours-allocator system` for glibc), bnb+peft on the system's, as its users run it (`--bnb-allocator mimalloc` to
give it mimalloc too); each run records the allocator it ran on.
`--repeats N` runs every configuration N times, in N rounds of all of them, and takes each measured value as the
median over its runs (each run's values are kept beside it): on the 2-core dev VM two runs of identical work in one
invocation differed by up to 19 % in median step time, so one run per configuration cannot settle a 10 % question.
Writes bench/results/train.json (CPU) or bench/results/gpu-train-<model>.json (GPU), or --out.
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
from checkout import ensure_importable  # noqa: E402

ensure_importable()
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_batches(n_rows: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """HF Trainer's default: shuffled each epoch, the last partial batch dropped."""
    import random

    rng = random.Random(seed)
    while True:
        order = list(range(n_rows))
        rng.shuffle(order)
        yield from (order[i : i + batch_size] for i in range(0, n_rows - batch_size + 1, batch_size))


PACK_TO = 256
"""Packed row length: the default data.max_length."""


def batches(args: argparse.Namespace, rows: list, pad: int) -> Iterator[tuple[Any, int]]:
    """Endless (batch, examples in it) of the configuration's batching mode, collated on the CPU."""
    from qlora_pipeline.stages.lm.batching import BatchPlan, collate, collate_packed, pack_rows

    lengths = [len(ids) for ids, _ in rows]
    if args.batching == "random":
        for idx in random_batches(len(rows), 8, 0):
            yield collate([rows[i] for i in idx], pad), len(idx)
        return
    if args.batching == "random_packed":  # bnb's batches, each laid out as train.packing lays out a batch
        for idx in random_batches(len(rows), 8, 0):
            yield collate_packed([[rows[i] for i in row] for row in pack_rows(lengths, idx, PACK_TO)], pad), len(idx)
        return
    plan = BatchPlan(lengths, 8, seed=0, pack_to=PACK_TO if args.batching == "packed" else None)
    for batch in plan.stream():
        yield plan.collate(batch, rows, pad), sum(len(row) for row in batch)


def load_rows(artifacts: Path, split: str) -> list[tuple[list[int], list[int]]]:
    import datasets

    from qlora_pipeline.stages.lm.batching import token_rows

    ds = datasets.load_from_disk(str(artifacts / "prepare" / "data"))[split]
    return token_rows(ds)


def llama3_8b_shape(out: Path, layers: int, tokenizer_dir: Path) -> Path:
    """A random bf16 model with Llama-3-8B's layer shapes and `layers` decoder blocks, plus our NF4 copy of it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from qlora_pipeline.kernels.formats.bnb_loader import save_4bit_checkpoint

    bf16, nf4 = out / "bf16", out / "nf4"
    if (nf4 / "config.json").exists():
        return out
    cfg = LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)  # initialised in bf16: half the memory
    model.save_pretrained(bf16, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(bf16)
    save_4bit_checkpoint(bf16, nf4, blocksize=64, compute_dtype="bfloat16")
    return out


def model_dirs(args: argparse.Namespace) -> tuple[Path, Path]:
    """(16-bit folder for bnb+peft, our NF4 folder) of the benchmarked model."""
    if args.model == "smollm2":
        return args.artifacts / "prepare" / "model", args.artifacts / "quantize" / "model"
    root = args.artifacts.parent / ".bench" / f"llama3-8b-shape-{args.layers}l"
    return root / "bf16", root / "nf4"


def worker(args: argparse.Namespace) -> dict:
    """One configuration, in this process: train `steps` steps (or until `tokens` real tokens), then held-out loss
    on the test split."""
    import torch

    from qlora_pipeline.kernels import dropout_cpu
    from qlora_pipeline.kernels.optim import adamw8bit_cpu
    from qlora_pipeline.stages.contract.device import peak_memory_mb, reset_peak_memory, resolve_device
    from qlora_pipeline.stages.contract.host_allocator import allocator_in_use
    from qlora_pipeline.stages.lm.lm_loss import heldout_loss

    torch.manual_seed(0)
    device = resolve_device(args.device)
    rows = load_rows(args.artifacts, "train")
    test = load_rows(args.artifacts, "test")[: args.eval_rows]
    pad = 2
    bf16_dir, nf4_dir = model_dirs(args)
    reset_peak_memory(device)
    if args.stack == "ours":
        model, trainable, step_fn = _ours(args, nf4_dir, device)
    else:
        model, trainable, step_fn = _bnb(args, bf16_dir, device)
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_model = peak_memory_mb(device)
    times, tokens, padded, examples, losses = [], [], [], [], []
    for batch, n_examples in batches(args, rows, pad):
        if (sum(tokens) >= args.tokens) if args.tokens else len(times) >= args.steps:
            break
        batch = batch.to(device)
        t0 = time.perf_counter()
        loss = step_fn(batch)  # returns a float: the step has finished on the device
        times.append(time.perf_counter() - t0)
        tokens.append(batch.n_tokens)
        padded.append(batch.input_ids.numel())
        examples.append(n_examples)
        losses.append(loss)
    gpu_train = peak_memory_mb(device)
    rss_train = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    timed = slice(2, None) if len(times) > 4 else slice(None)
    held = heldout_loss(model, test, 8, pad)["loss"] if args.eval else None
    return {
        "stack": args.stack,
        "model": args.model,
        "device": str(device),
        "optimizer": args.optimizer,
        "batching": args.batching,
        "bnb_autocast": args.bnb_autocast and args.bnb_dtype != "float32" if args.stack == "bnb+peft" else None,
        "compute_dtype": args.bnb_dtype if args.stack == "bnb+peft" else model_compute_dtype(model),
        "recompute_budget_tokens": getattr(step_fn, "recompute_budget_tokens", None),
        "peak_gpu_allocated_mb": gpu_train.get("cuda_max_allocated_mb"),
        "peak_gpu_reserved_mb": gpu_train.get("cuda_max_reserved_mb"),
        "gpu_allocated_after_load_mb": gpu_model.get("cuda_max_allocated_mb"),
        "steps": len(times),
        "median_step_s": statistics.median(times[timed]),
        "step_s": [round(t, 3) for t in times],
        "tokens_per_s": sum(tokens[timed]) / sum(times[timed]),
        "tokens_trained": sum(tokens),
        "padded_tokens_per_step": statistics.mean(padded),
        "padding_share": round(1 - sum(tokens) / sum(padded), 4),
        "examples_per_step": statistics.mean(examples),
        "first_loss": losses[0],
        "last5_loss": statistics.mean(losses[-5:]),
        "heldout_loss": held,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "host_allocator": allocator_in_use(),
        "cpu_dropout_masks": "compiled" if dropout_cpu.compiled_in_use() else "torch",
        "cpu_adamw8bit": "compiled" if adamw8bit_cpu.compiled_in_use() else "torch",
        "peak_rss_train_mb": rss_train,
        "rss_after_load_mb": rss_model,
        "trainable": sum(p.numel() for p in trainable),
    }


def _ours(args: argparse.Namespace, nf4_dir: Path, device):
    import torch

    from qlora_pipeline.kernels.lora_copies import ComputeCopies
    from qlora_pipeline.stages.contract.params import Params, TrainParams
    from qlora_pipeline.stages.lm.lm_loss import summed_loss
    from qlora_pipeline.stages.lm.recompute import recompute_budget_of, set_recompute
    from qlora_pipeline.stages.train import build_model, compute_dtype, make_optimizer

    t = TrainParams(
        optimizer=args.optimizer,
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=TARGETS,
        compute_dtype=args.compute_dtype,
        **({} if args.checkpoint_min_tokens is None else {"checkpoint_min_tokens": args.checkpoint_min_tokens}),
        **({} if args.weight_cache_mb is None else {"frozen_weight_cache_mb": args.weight_cache_mb}),
    )
    model, trainable = build_model(nf4_dir, t, device, compute_dtype(t, device))
    opt = make_optimizer(trainable, t)
    budget = recompute_budget_of(model, Params(train=t), device)
    model.train()
    copies = ComputeCopies(model)

    def step(batch) -> float:
        with copies.fresh():  # as stages/train.py does
            set_recompute(model, budget, batch)
            total, n = summed_loss(model, batch)
            loss = total / max(n, 1)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    step.recompute_budget_tokens = None if budget is None else budget.tokens  # what auto took on this device
    return model, trainable, step


def _bnb(args: argparse.Namespace, bf16_dir: Path, device):
    import contextlib

    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = getattr(torch, args.bnb_dtype)
    qc = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    model = AutoModelForCausalLM.from_pretrained(
        bf16_dir, quantization_config=qc, dtype=dtype, device_map={"": str(device)}
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM")
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    cls = bnb.optim.PagedAdamW8bit if args.optimizer.endswith("8bit") else bnb.optim.PagedAdamW32bit
    opt = cls(trainable, lr=2e-4, weight_decay=0.0)
    model.train()

    def autocast():
        if not args.bnb_autocast or args.bnb_dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)  # HF Trainer's bf16=True

    def step(batch) -> float:
        with autocast():
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss)

    return model, trainable, step


def model_compute_dtype(model: Any) -> str:
    """The compute dtype our NF4 layers run in."""
    from qlora_pipeline.kernels.dtypes import dtype_name
    from qlora_pipeline.kernels.linear4bit import Linear4bit

    layer = next(m for m in model.modules() if isinstance(m, Linear4bit))
    return dtype_name(layer.compute_dtype)


def run_worker(args: argparse.Namespace, stack: str, bits: str, batching: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--stack", stack, "--optimizer", f"paged_adamw_{bits}"]
    cmd += ["--batching", batching, "--steps", str(args.steps), "--artifacts", str(args.artifacts)]
    cmd += ["--tokens", str(args.tokens)] if args.tokens else []
    cmd += ["--device", args.device, "--model", args.model, "--layers", str(args.layers)]
    cmd += [] if args.eval_rows is None else ["--eval-rows", str(args.eval_rows)]
    for flag in ("checkpoint_min_tokens", "weight_cache_mb"):
        value = getattr(args, flag)
        cmd += [] if value is None else ["--" + flag.replace("_", "-"), str(value)]
    cmd += [] if args.eval else ["--no-eval"]
    cmd += ["--bnb-autocast" if args.bnb_autocast else "--no-bnb-autocast"]
    cmd += ["--bnb-dtype", args.bnb_dtype, "--compute-dtype", args.compute_dtype]
    budget = f"{args.tokens} tokens" if args.tokens else f"{args.steps} steps"
    print(f"running {stack} paged_adamw_{bits} on {args.model} ({batching} batches, {budget})", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(args, stack))
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        print(proc.stderr[-3000:])
        raise SystemExit(f"{stack} failed")
    res = json.loads(line[len("RESULT ") :])
    print(json.dumps(res), flush=True)
    return res


def worker_env(args: argparse.Namespace, stack: str) -> dict[str, str]:
    """The worker's environment: ours on the C allocator the CLI would run it on (mimalloc where installed and
    probed; --ours-allocator system to compare), bnb + peft on the system's, as its users run it (or mimalloc)."""
    from qlora_pipeline.stages.contract.host_allocator import CHOICE_VAR, preload_env

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    choice = args.ours_allocator if stack == "ours" else args.bnb_allocator
    return preload_env({**env, CHOICE_VAR: choice}) or env


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


CONFIGS = (("bnb+peft", "random"), ("ours", "grouped"), ("ours", "packed"))
"""Each stack as it batches out of the box, and ours with packing on."""


MEASURED = ("median_step_s", "tokens_per_s", "peak_rss_mb", "peak_rss_train_mb", "peak_gpu_allocated_mb")
"""What each run measures and a repeated configuration reports as the median over its runs."""


def pooled(runs: list[dict]) -> dict:
    """One configuration's runs as one result: each measured value the median over the runs (the first run's other
    fields: batches, losses and held-out loss are the same in every run), the runs' own values kept beside it."""
    out = dict(runs[0])
    for key in MEASURED:
        values = [r[key] for r in runs]
        out[key] = None if None in values else statistics.median(values)
        if len(runs) > 1:
            out[f"{key}_runs"] = values
    return out


def compare(results: list[dict], bits: str) -> dict[str, Any]:
    """Every configuration of ours against bnb+peft (step time, tokens/s, peak memory) and the held-out losses;
    a configuration run more than once (--repeats) by the medians over its runs."""
    mine = [r for r in results if r["optimizer"].endswith(bits)]
    configs: dict[tuple[str, str], list[dict]] = {}
    for r in mine:
        configs.setdefault((r["stack"], r["batching"]), []).append(r)
    pooled_runs = {key: pooled(runs) for key, runs in configs.items()}
    base = next(r for (stack, _), r in pooled_runs.items() if stack == "bnb+peft")
    out: dict[str, Any] = {
        "heldout_loss_bnb": base["heldout_loss"],
        "runs_per_configuration": len(configs[next(iter(configs))]),
    }
    for (stack, tag), ours in pooled_runs.items():
        if stack != "ours":
            continue
        out[f"ours_{tag}"] = {
            "step_time_ratio_ours_over_bnb": ratio(ours["median_step_s"], base["median_step_s"]),
            "tokens_per_s_ratio_ours_over_bnb": ratio(ours["tokens_per_s"], base["tokens_per_s"]),
            "peak_rss_ratio_ours_over_bnb": ratio(ours["peak_rss_mb"], base["peak_rss_mb"]),
            "peak_rss_train_ratio_ours_over_bnb": ratio(ours["peak_rss_train_mb"], base["peak_rss_train_mb"]),
            "peak_gpu_allocated_ratio_ours_over_bnb": ratio(
                ours["peak_gpu_allocated_mb"], base["peak_gpu_allocated_mb"]
            ),
            "heldout_loss_ours": ours["heldout_loss"],
        }
        if "median_step_s_runs" in ours:  # round by round: what the median hides
            pairs = zip(ours["median_step_s_runs"], base["median_step_s_runs"], strict=True)
            out[f"ours_{tag}"]["step_time_ratio_per_round"] = [ratio(a, b) for a, b in pairs]
            pairs = zip(ours["peak_rss_mb_runs"], base["peak_rss_mb_runs"], strict=True)
            out[f"ours_{tag}"]["peak_rss_ratio_per_round"] = [ratio(a, b) for a, b in pairs]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=None, help="train each configuration on this many real tokens")
    ap.add_argument("--same-batches", action="store_true")
    ap.add_argument(
        "--all-batchings", action="store_true", help="ours on bnb's random batches and on its own, in one run"
    )
    ap.add_argument("--no-eval", dest="eval", action="store_false")
    ap.add_argument("--eval-rows", type=int, default=None, help="score only the first N test rows")
    ap.add_argument("--optimizers", default="32bit,8bit")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (as runtime.device)")
    ap.add_argument("--model", choices=("smollm2", "llama3-8b-shape"), default="smollm2")
    ap.add_argument("--layers", type=int, default=2, help="decoder blocks of the llama3-8b-shape model")
    ap.add_argument("--bnb-autocast", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--bnb-dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--compute-dtype", choices=("auto", "bfloat16", "float32"), default="auto", help="ours")
    ap.add_argument("--checkpoint-min-tokens", type=int, default=None, help="ours: train.checkpoint_min_tokens")
    ap.add_argument("--weight-cache-mb", type=float, default=None, help="ours: train.frozen_weight_cache_mb")
    ap.add_argument(
        "--repeats", type=int, default=1, help="run every configuration this many times, in rounds; report medians"
    )
    ap.add_argument("--ours-allocator", choices=("auto", "system", "mimalloc"), default="auto")
    ap.add_argument("--bnb-allocator", choices=("system", "mimalloc"), default="system")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--stack", default="ours")
    ap.add_argument("--optimizer", default="paged_adamw_32bit")
    ap.add_argument("--batching", default="grouped")
    args = ap.parse_args()
    from qlora_pipeline.kernels.dtypes import cpu_multiplies_bf16
    from qlora_pipeline.stages.contract.device import describe, resolve_device

    device = resolve_device(args.device)
    if args.bnb_autocast is None:
        args.bnb_autocast = True
    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return
    if args.model == "llama3-8b-shape":
        llama3_8b_shape(model_dirs(args)[0].parent, args.layers, args.artifacts / "prepare" / "model")
    same = [("bnb+peft", "random"), ("ours", "random"), ("ours", "random_packed")]
    configs = same if args.same_batches else list(CONFIGS)
    if args.all_batchings:
        configs = [*same, *CONFIGS[1:]]
    results = [  # in rounds, so a machine that speeds up or slows down during the run touches every configuration
        run_worker(args, stack, bits, batching) | {"round": round_}
        for round_ in range(args.repeats)
        for bits in args.optimizers.split(",")
        for stack, batching in configs
    ]
    ratios = {f"paged_adamw_{bits}": compare(results, bits) for bits in args.optimizers.split(",")}
    summary = {
        "device": describe(device),
        "model": args.model,
        "layers": args.layers if args.model != "smollm2" else None,
        "steps": None if args.tokens else args.steps,
        "tokens": args.tokens,
        "same_batches": args.same_batches,
        "all_batchings": args.all_batchings,
        "checkpoint_min_tokens": args.checkpoint_min_tokens,
        "weight_cache_mb": args.weight_cache_mb,
        "bnb_autocast": args.bnb_autocast and args.bnb_dtype != "float32",
        "bnb_dtype": args.bnb_dtype,
        "compute_dtype": args.compute_dtype,
        "ours_allocator": args.ours_allocator,
        "bnb_allocator": args.bnb_allocator,
        "cpu_multiplies_bf16": cpu_multiplies_bf16(),
        "repeats": args.repeats,
        "results": results,
        "ratios": ratios,
    }
    print(json.dumps(ratios, indent=1))
    if args.out is not None:
        out = args.out
    elif device.type == "cuda":
        out = ROOT / "bench" / "results" / f"gpu-train-{args.model}.json"
    else:
        out = ROOT / "bench" / "results" / ("train_same_batches.json" if args.same_batches else "train.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
