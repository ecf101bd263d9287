"""Where one training step spends its time: torch.profiler's top ops by self time (CPU time on a CPU, device time
on a GPU), ours and bnb+peft, on the same batch.

    .venv/bin/python bench/profile_step.py [--stack ours|bnb+peft|both] [--tag before] [--rows 20]
                                           [--device cpu|cuda] [--batching random|packed] [--out FILE]
                                           [--optimizer paged_adamw_32bit|paged_adamw_8bit]

Builds each stack exactly as bench/bench_train.py does (SmolLM2 from artifacts/prepare and artifacts/quantize,
LoRA r=16 on all 7 projections, gradient checkpointing, paged AdamW 32-bit or ``--optimizer``'s; bnb+peft under bf16
autocast as HF Trainer with bf16=True), runs two warm-up steps on HF-style random batches (or ours packed as
train.packing packs them: ``--batching packed``), then times the third without a profiler, profiles it (top ops)
and runs it once more under cProfile (top Python functions by own time: where a launch-bound step's host time
goes). Each stack in its own subprocess. Writes
bench/results/profile_step-<tag>.txt (or --out).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def profile_one(args: argparse.Namespace) -> str:
    import bench_train as bt
    import torch
    from torch.profiler import ProfilerActivity, profile

    opts = argparse.Namespace(
        optimizer=args.optimizer,
        bnb_autocast=True,
        model="smollm2",
        artifacts=args.artifacts,
        layers=2,
        checkpoint_min_tokens=None,
        weight_cache_mb=None,
        compute_dtype="auto",
        bnb_dtype=args.bnb_dtype,
    )
    torch.manual_seed(0)
    rows = bt.load_rows(args.artifacts, "train")
    bf16_dir, nf4_dir = bt.model_dirs(opts)
    device = torch.device(args.device)
    _, _, step = bt._ours(opts, nf4_dir, device) if args.stack == "ours" else bt._bnb(opts, bf16_dir, device)
    from qlora_pipeline.stages.lm.batching import collate

    if args.batching == "packed":  # ours by default: train.packing's batches, as bench_train.py's packed rows
        stream = bt.batches(argparse.Namespace(batching="packed"), rows, 2)
        batches = [next(stream)[0].to(device) for _ in range(3)]
    else:
        stream = bt.random_batches(len(rows), 8, 0)
        batches = [collate([rows[i] for i in next(stream)], 2).to(device) for _ in range(3)]
    for batch in batches[:2]:
        step(batch)
    t0 = time.perf_counter()
    step(batches[2])  # unprofiled: the step's wall time, which on a launch-bound GPU is its host time
    plain_ms = (time.perf_counter() - t0) * 1000
    gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if gpu else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        loss = step(batches[2])  # returns a float: the step has finished on the device
    events = prof.key_averages()
    key = "self_device_time_total" if gpu else "self_cpu_time_total"
    # user-annotated ranges (the optimizer's "Optimizer.step#...") carry their whole span as device time: left out
    total_ms = sum(getattr(e, key) for e in events if not getattr(e, "is_user_annotation", False)) / 1000
    table = events.table(sort_by=key, row_limit=args.rows, max_name_column_width=48)
    shape = "x".join(map(str, batches[2].input_ids.shape))
    head = f"== {args.stack} on {device}: one step, {args.batching} batch {shape} ({batches[2].n_tokens} tokens), "
    head += f"{args.optimizer}, "
    head += f"loss {loss:.4f}, "
    head += (
        f"self {'device' if gpu else 'CPU'} total {total_ms:.0f} ms, unprofiled step {plain_ms:.0f} ms ==\n{table}\n"
    )
    return head + _host_profile(step, batches[2], args.rows)


def _host_profile(step, batch, rows: int) -> str:
    """The same step under cProfile: the Python functions by own time (the host work a launch-bound GPU step
    waits on: our nodes, Triton's launcher, transformers' modules, the optimizer)."""
    profiler = cProfile.Profile()
    profiler.enable()
    step(batch)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(rows)
    body = text.getvalue()
    return (
        "-- host: Python functions by own time (cProfile, the same batch again) --\n" + body[body.index("   ncalls") :]
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    ap.add_argument("--stack", default="both")
    ap.add_argument("--tag", default="now")
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--bnb-dtype", choices=("bfloat16", "float32"), default="bfloat16", help="bnb+peft; float32: no autocast"
    )
    ap.add_argument("--batching", choices=("random", "packed"), default="random", help="packed: ours only")
    ap.add_argument("--optimizer", choices=("paged_adamw_32bit", "paged_adamw_8bit"), default="paged_adamw_32bit")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(profile_one(args))
        return
    stacks = ["ours", "bnb+peft"] if args.stack == "both" else [args.stack]
    parts = []
    for stack in stacks:
        cmd = [sys.executable, __file__, "--worker", "--stack", stack, "--artifacts", str(args.artifacts)]
        cmd += ["--device", args.device, "--bnb-dtype", args.bnb_dtype, "--batching", args.batching]
        cmd += ["--optimizer", args.optimizer]
        proc = subprocess.run([*cmd, "--rows", str(args.rows)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        parts.append(proc.stdout[proc.stdout.index("== ") :])
        print(parts[-1], flush=True)
    out = args.out or ROOT / "bench" / "results" / f"profile_step-{args.tag}.txt"
    out.write_text("".join(parts))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
