"""Forward + backward time of one NF4 Linear4bit layer per compute dtype (fp32 vs bf16) on this machine.

Why bf16 is the CPU default compute dtype of ``qlora_pipeline.kernels.linear4bit`` (its docstring has the numbers):
re-run this on a CPU without AVX512-BF16 before trusting that default there.

    .venv/bin/python bench/bench_linear4bit.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import time

import torch

from qlora_pipeline.kernels.linear4bit import Linear4bit
from qlora_pipeline.kernels.nf4 import quantize_nf4


def bench_compute_dtype(repeats: int = 15) -> dict[str, float]:
    """Median forward+backward ms of a 576->1536 NF4 layer on 8x256 tokens, per compute dtype.

    The two dtypes alternate call by call so background load hits both alike.
    """
    torch.manual_seed(0)
    nf4 = quantize_nf4(torch.randn(1536, 576, dtype=torch.bfloat16) * 0.02)
    dtypes = (torch.float32, torch.bfloat16)
    layers = {d: Linear4bit(nf4, compute_dtype=d) for d in dtypes}
    inputs = {d: torch.randn(8, 256, 576, dtype=d, requires_grad=True) for d in dtypes}
    times: dict[torch.dtype, list[float]] = {d: [] for d in dtypes}
    for i in range(repeats + 2):
        for d in dtypes:
            t0 = time.perf_counter()
            layers[d](inputs[d]).float().sum().backward()
            if i >= 2:
                times[d].append(time.perf_counter() - t0)
    return {str(d).removeprefix("torch."): 1000 * sorted(t)[len(t) // 2] for d, t in times.items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    print(f"threads={torch.get_num_threads()}", bench_compute_dtype(args.repeats))
