"""One LoRA projection over an NF4 base, forward and backward: the frozen product and the branch as one autograd
node (``frozen_linear_with_lora``, what training runs) against the two nodes it replaced (``Linear4bit`` then
``add_lora_branch``), in one process.

    .venv/bin/python bench/ab_lora_node.py [--dtype bfloat16|float32] [--tokens 370] [--rounds 400]

SmolLM2's four projection shapes (576→576, 576→192, 576→1536, 1536→576), LoRA r = 16, the CPU's seeded dropout
mask at 0.05, the weight dequantized once and kept (as the CPU weight cache keeps it); the two arms alternate and
each prints its median. Random weights and inputs: the time does not depend on the values. docs/speed.md, eighth
session, holds the figures.
"""

from __future__ import annotations

import argparse
import statistics
import time

SHAPES = ((576, 576), (576, 192), (576, 1536), (1536, 576))


def projection_ab(n_in: int, n_out: int, dtype_name: str, tokens: int, rounds: int) -> tuple[float, float]:
    """Median seconds of one forward + backward of one projection: (two nodes, one node)."""
    import torch
    from torch import nn

    from qlora_pipeline.kernels.dropout import FastDropout, SeededMask, draw_seed
    from qlora_pipeline.kernels.linear4bit import Linear4bit, cache_dequantized_weights
    from qlora_pipeline.kernels.lora_fused import add_lora_branch, frozen_linear_with_lora
    from qlora_pipeline.kernels.nf4 import quantize_nf4

    dtype = getattr(torch, dtype_name)
    threshold = FastDropout(0.05).threshold
    scale = 2.0 / (1 - threshold / 65536)  # alpha / r = 2, times the keep-rate rescaling
    torch.manual_seed(0)
    base = Linear4bit(quantize_nf4(torch.randn(n_out, n_in) * 0.02, blocksize=64), compute_dtype=dtype)
    cache_dequantized_weights(nn.Sequential(base), 2**30, dtype)
    a = (torch.randn(16, n_in) * 0.02).requires_grad_()
    b = (torch.randn(n_out, 16) * 0.01).requires_grad_()
    x = torch.randn(tokens, n_in, dtype=dtype, requires_grad=True)
    g = torch.randn(tokens, n_out, dtype=dtype)

    def step(one_node: bool) -> float:
        x.grad = a.grad = b.grad = None
        seeded = SeededMask(draw_seed(), threshold)
        start = time.perf_counter()
        if one_node:
            y = frozen_linear_with_lora(x, base.weight_source(dtype, x.device), None, a, b, scale, seeded=seeded)
        else:
            y = add_lora_branch(base(x), x, a, b, scale, seeded=seeded)
        y.backward(g)
        return time.perf_counter() - start

    for _ in range(20):
        step(False), step(True)
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(rounds):
        times[bool(r % 2)].append(step(bool(r % 2)))
    return statistics.median(times[False]), statistics.median(times[True])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--tokens", type=int, default=370, help="rows of x (370: a packed SmolLM2 batch)")
    ap.add_argument("--rounds", type=int, default=400)
    args = ap.parse_args()
    for n_in, n_out in SHAPES:
        two, one = projection_ab(n_in, n_out, args.dtype, args.tokens, args.rounds)
        print(
            f"{n_in}->{n_out} {args.dtype}: two nodes {two * 1e6:,.0f} us, one node {one * 1e6:,.0f} us, "
            f"one / two {one / two:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
