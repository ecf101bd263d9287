"""Ours with the compiled CPU kernels (dropout masks; 8-bit AdamW with ``--optimizer paged_adamw_8bit``) against
the torch references, in one process.

    .venv/bin/python bench/ab_cpu_kernels.py [--batching random] [--rounds 3] [--optimizer paged_adamw_8bit]

Builds ours as bench/bench_train.py's worker does (SmolLM2 from artifacts/prepare and artifacts/quantize, LoRA r=16
with dropout 0.05 on all 7 projections, paged AdamW 32-bit or ``--optimizer``'s), then times the same ten batches
(bnb's padded random batches by default, the 8 x 256 one left out) with ``QLORA_CPU_KERNELS=off`` and with the
kernels, alternating the order each round, and prints each round and the medians. Run it under the CLI's allocator
for the numbers in docs/speed.md (``LD_PRELOAD`` naming mimalloc, ``MIMALLOC_ALLOW_THP=0``). The kernels compute the
references' bits, so the two arms train identically; only the time differs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    import bench_train as bt
    import torch

    from qlora_pipeline.kernels import cpu_native

    ap = argparse.ArgumentParser()
    ap.add_argument("--batching", default="random", choices=("random", "random_packed", "packed", "grouped"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--optimizer", default="paged_adamw_32bit", choices=("paged_adamw_32bit", "paged_adamw_8bit"))
    cli = ap.parse_args()
    args = argparse.Namespace(
        artifacts=ROOT / "artifacts",
        optimizer=cli.optimizer,
        model="smollm2",
        layers=2,
        compute_dtype="auto",
        checkpoint_min_tokens=None,
        weight_cache_mb=None,
        batching=cli.batching,
    )
    rows = bt.load_rows(args.artifacts, "train")
    _, _, step = bt._ours(args, bt.model_dirs(args)[1], torch.device("cpu"))
    stream = bt.batches(args, rows, 2)
    batches = [next(stream)[0] for _ in range(12)]
    timed = [b for b in batches if b.input_ids.numel() < 2048][:10]
    step(batches[0])
    times: dict[str, list[float]] = {"torch": [], "compiled": []}
    for rnd in range(cli.rounds):
        for arm in ("torch", "compiled") if rnd % 2 == 0 else ("compiled", "torch"):
            os.environ[cpu_native.SWITCH_VAR] = "off" if arm == "torch" else "on"
            t0 = time.perf_counter()
            for batch in timed:
                step(batch)
            times[arm].append(time.perf_counter() - t0)
            print(f"round {rnd + 1}: {arm} {times[arm][-1]:.2f} s for {len(timed)} steps", flush=True)
    base, new = (statistics.median(times[k]) for k in ("torch", "compiled"))
    print(f"median: torch references {base:.2f} s, compiled {new:.2f} s, {100 * (new / base - 1):+.1f} %")


if __name__ == "__main__":
    main()
