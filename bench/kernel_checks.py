"""The Triton kernels on a device against their torch references on the CPU, bit for bit, plus paging under a budget.

    python bench/kernel_checks.py --device cuda [--out bench/results/gpu-kernels.json]

- NF4 + double-quant dequant (one launch; the 1-D and the 2-D tile kernel) to fp32, bf16 and fp16 against
  ``qlora_pipeline.kernels.nf4.dequantize_nf4`` run on the CPU, on weight shapes up to 4096x14336 with a ragged tail;
- the 8-bit AdamW step over several steps against ``adamw8bit_update_reference`` on the CPU (params, state codes
  and absmax compared as bits);
- our AdamW (32- and 8-bit state) paged under a byte budget smaller than its state (one tensor updated at a time)
  against the same optimizer unpaged (small tensors updated together), on the device: identical parameters, with
  evictions and reloads counted;
- our 32-bit AdamW against ``torch.optim.AdamW(foreach=True)`` on the device: identical parameters;
- the Triton RMSNorm, forward and backward, against ``qlora_pipeline.kernels.rmsnorm``'s reference on the CPU: not
  bit for bit (its row sums run in another order) but within one rounding (bf16: at most one unit in the last place,
  99 % of elements the same bits; fp32: 4 units of the row's largest value); with the time of a forward + backward
  against the reference's torch ops on the same device (host-bound steps pay per launch: 2 launches against 26);
- the Triton rotary embedding of q and k in one launch, forward and backward, against ``qlora_pipeline.kernels.rope``'s
  reference on the CPU, bit for bit, on q and k as the attention hands them (head-major views of token-major rows,
  SmolLM2's and Llama-3-8B's head counts); timed against the torch ops;
- the Triton SwiGLU, forward and both gradients, against ``qlora_pipeline.kernels.swiglu``'s reference on the CPU,
  within one rounding as the RMSNorm (its exponential is not torch's); timed against the torch ops;
- A's and B's gradient products written in fp32 from bf16 inputs (``qlora_pipeline.kernels.lora_fused.widening_mm``:
  one launch where cuBLAS takes ``out_dtype``) against the reference's 16-bit product and cast: no farther from
  the fp64 product than the reference is; with the path taken and both timed.

With ``--device cpu`` the same checks run through the Triton interpreter at small sizes (a dry run of the script;
set TRITON_INTERPRET=1 before Python starts, which this script does for itself). Exit 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first @triton.jit

import torch
from checkout import ensure_importable

ensure_importable()

from qlora_pipeline.kernels.dynamic_map import requantize_blockwise  # noqa: E402
from qlora_pipeline.kernels.lora_fused import widening_mm, widening_mm_is_one_launch  # noqa: E402
from qlora_pipeline.kernels.nf4 import dequantize_nf4, quantize_nf4  # noqa: E402
from qlora_pipeline.kernels.nf4_triton import TILE_BLOCKS_GPU, dequantize_nf4_triton  # noqa: E402
from qlora_pipeline.kernels.optim.adam8bit_triton import adamw8bit_update_triton  # noqa: E402
from qlora_pipeline.kernels.optim.adam_scalars import AdamScalars  # noqa: E402
from qlora_pipeline.kernels.optim.adamw import AdamW  # noqa: E402
from qlora_pipeline.kernels.optim.adamw_math import QuantMaps, adamw8bit_update_reference  # noqa: E402
from qlora_pipeline.kernels.optim.paging import PagingConfig  # noqa: E402
from qlora_pipeline.kernels.rmsnorm import rmsnorm_backward_reference, rmsnorm_forward_reference  # noqa: E402
from qlora_pipeline.kernels.rmsnorm_triton import rmsnorm_backward_triton, rmsnorm_forward_triton  # noqa: E402
from qlora_pipeline.kernels.rope import rope_backward_reference, rope_forward_reference  # noqa: E402
from qlora_pipeline.kernels.rope_triton import rope_triton  # noqa: E402
from qlora_pipeline.kernels.swiglu import swiglu_backward_reference, swiglu_forward_reference  # noqa: E402
from qlora_pipeline.kernels.swiglu_triton import swiglu_backward_triton, swiglu_forward_triton  # noqa: E402

BS = 256


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach().cpu(), b.detach().cpu()
    if a.is_floating_point():
        ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
        a, b = a.view(ints), b.view(ints)
    return a.shape == b.shape and torch.equal(a, b)


def check_dequant(device: torch.device, shapes: list[tuple[int, int]]) -> list[dict]:
    out = []
    gen = torch.Generator().manual_seed(0)
    for shape in shapes:
        w = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        nf4 = quantize_nf4(w)
        on_dev = nf4.to(device)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            ref = dequantize_nf4(nf4, dtype)
            kernels = (("1d", None, False), ("tile", TILE_BLOCKS_GPU, False), ("pairs", TILE_BLOCKS_GPU, True))
            for kernel, tile_blocks, pairs in kernels:  # the tile kernels at the GPU default
                got = dequantize_nf4_triton(on_dev, dtype, tile_blocks, pairs)
                row = {"check": "nf4_dq_dequant", "kernel": kernel, "shape": list(shape), "dtype": str(dtype)[6:]}
                out.append({**row, "ok": same_bits(ref, got)})
    return out


def _maps(m: QuantMaps) -> tuple[torch.Tensor, ...]:
    return m.code1, m.code2, m.lut1, m.lut2


def check_adam8bit(device: torch.device, n: int, steps: int) -> list[dict]:
    out = []
    gen = torch.Generator().manual_seed(1)
    cpu_maps, dev_maps = QuantMaps.create("cpu"), QuantMaps.create(device)
    for dtype in (torch.float32, torch.bfloat16):
        p = torch.randn(n, generator=gen).to(dtype)
        m, v = torch.randn(n, generator=gen) * 0.1, torch.rand(n, generator=gen) * 1e-2
        q1, a1 = requantize_blockwise(m, cpu_maps.lut1, BS)
        q2, a2 = requantize_blockwise(v, cpu_maps.lut2, BS)
        ref = [p.clone(), q1.clone(), q2.clone(), a1.clone(), a2.clone()]
        dev = [t.clone().to(device) for t in ref]
        ok = True
        for step in range(1, steps + 1):
            g = (torch.randn(n, generator=gen) * 0.3).to(dtype)
            s = AdamScalars.make(1e-3, (0.9, 0.999), 1e-8, 0.01, step)
            adamw8bit_update_reference(ref[0], g, *ref[1:], *_maps(cpu_maps), s, BS)
            adamw8bit_update_triton(dev[0], g.to(device), *dev[1:], *_maps(dev_maps), s, BS)
            ok = ok and all(same_bits(a, b) for a, b in zip(ref, dev, strict=True))
        out.append({"check": "adamw8bit_step", "n": n, "steps": steps, "dtype": str(dtype)[6:], "ok": ok})
    return out


def check_paging(device: torch.device, sizes: list[int], steps: int) -> list[dict]:
    out = []
    for bits in (32, 8):
        gen = torch.Generator().manual_seed(2)
        init = [torch.randn(n, generator=gen) for n in sizes]
        grads = [[torch.randn(n, generator=gen) for n in sizes] for _ in range(steps)]
        results = {}
        for paged in (False, True):
            params = [torch.nn.Parameter(t.clone().to(device)) for t in init]
            state_bytes = sum(n * (8 if bits == 32 else 2) for n in sizes)
            paging = PagingConfig(budget_bytes=state_bytes // 3) if paged else None
            opt = AdamW(params, lr=1e-3, weight_decay=0.01, state_bits=bits, paging=paging)
            for step in range(steps):
                for p, g in zip(params, grads[step], strict=True):
                    p.grad = g.to(device)
                opt.step()
            opt.synchronize()
            results[paged] = ([p.detach().cpu() for p in params], opt.paging_stats() if paged else {})
        (plain, _), (paged_params, stats) = results[False], results[True]
        ok = all(same_bits(a, b) for a, b in zip(plain, paged_params, strict=True)) and stats.get("evictions", 0) > 0
        out.append(
            {
                "check": "paged_adamw",
                "state_bits": bits,
                "state_mib": round(sum(n * (8 if bits == 32 else 2) for n in sizes) / 2**20, 2),
                "budget_fraction": 1 / 3,
                "evictions": stats.get("evictions"),
                "pages_in": stats.get("pages_in"),
                "ok": ok,
            }
        )
    return out


def check_adamw32_vs_torch(device: torch.device, sizes: list[int], steps: int) -> list[dict]:
    """Our 32-bit AdamW (several tensors in one foreach call) against torch.optim.AdamW(foreach=True), the
    multi-tensor path torch takes by default on CUDA, on the device: the same bits."""
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(n, generator=gen) for n in sizes]
    grads = [[torch.randn(n, generator=gen) for n in sizes] for _ in range(steps)]
    ours = [torch.nn.Parameter(t.clone().to(device)) for t in init]
    theirs = [torch.nn.Parameter(t.clone().to(device)) for t in init]
    opts = (
        AdamW(ours, lr=1e-3, weight_decay=0.01),
        torch.optim.AdamW(theirs, lr=1e-3, weight_decay=0.01, foreach=True),
    )
    for step in range(steps):
        for ps in (ours, theirs):
            for p, g in zip(ps, grads[step], strict=True):
                p.grad = g.to(device)
        for opt in opts:
            opt.step()
    ok = all(same_bits(a.detach().cpu(), b.detach().cpu()) for a, b in zip(ours, theirs, strict=True))
    return [{"check": "adamw32_vs_torch", "sizes": sizes, "steps": steps, "ok": ok}]


def _close(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """Within one rounding of the reference: bf16 at most one unit in the last place of each element and 99 % the
    same bits; fp32 within 4 units in the last place of the row's largest value (backward's terms cancel)."""
    got = got.detach().cpu()
    if got.shape != ref.shape or got.dtype != ref.dtype:
        return False
    diff = (got.double() - ref.double()).abs()
    if ref.dtype == torch.bfloat16:
        unit = torch.exp2(torch.floor(torch.log2(ref.double().abs().clamp_min(1e-30)))) * 2.0**-7
        return bool(diff.le(unit).all() and (got == ref).double().mean() >= 0.99)
    return bool(diff.le(4 * ref.double().abs().amax(-1, keepdim=True) * 2.0**-23).all())


def _median_us(run, device: torch.device, n: int) -> float:
    """Median wall time of `run()`, synchronized, in µs."""
    times = []
    for _ in range(n):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return round(sorted(times)[n // 2] * 1e6, 1)


def _rmsnorm_fwd_bwd(forward, backward, x: torch.Tensor, w: torch.Tensor) -> None:
    """One forward and its backward, y's own values as its gradient."""
    backward(x, w, 1e-5, forward(x, w, 1e-5))


def check_rmsnorm(device: torch.device, shapes: list[tuple[int, int]], timed: int) -> list[dict]:
    out = []
    gen = torch.Generator().manual_seed(0)
    for rows, cols in shapes:
        for dtype in (torch.bfloat16, torch.float32):
            x = (torch.randn(rows, cols, generator=gen) * 3).to(dtype)
            w = (1 + torch.randn(cols, generator=gen) / 4).to(dtype)
            g = torch.randn(rows, cols, generator=gen).to(dtype)
            ref_y, ref_dx = rmsnorm_forward_reference(x, w, 1e-5), rmsnorm_backward_reference(x, w, 1e-5, g)
            xd, wd, gd = x.to(device), w.to(device), g.to(device)
            y, dx = rmsnorm_forward_triton(xd, wd, 1e-5), rmsnorm_backward_triton(xd, wd, 1e-5, gd)
            ok = all(_close(a, b) for a, b in ((y, ref_y), (dx, ref_dx)))
            row = {"check": "rmsnorm", "shape": [rows, cols], "dtype": str(dtype)[6:], "ok": ok}
            if timed:
                twin = _median_us(
                    partial(_rmsnorm_fwd_bwd, rmsnorm_forward_triton, rmsnorm_backward_triton, xd, wd), device, timed
                )
                torch_ops = _median_us(
                    partial(_rmsnorm_fwd_bwd, rmsnorm_forward_reference, rmsnorm_backward_reference, xd, wd),
                    device,
                    timed,
                )
                row |= {"fwd_bwd_us_twin": twin, "fwd_bwd_us_torch_ops": torch_ops}
            out.append(row)
    return out


def _rope_twin(q, k, gq, gk, cos, sin) -> None:
    rope_triton((q, k), cos, sin, backward=False), rope_triton((gq, gk), cos, sin, backward=True)


def _rope_ops(q, k, gq, gk, cos, sin) -> None:
    for x, g in ((q, gq), (k, gk)):
        rope_forward_reference(x, cos, sin), rope_backward_reference(g, cos, sin)


def _swiglu_twin(gate, up, grad) -> None:
    swiglu_forward_triton(gate, up), swiglu_backward_triton(gate, up, grad)


def _swiglu_ops(gate, up, grad) -> None:
    swiglu_forward_reference(gate, up), swiglu_backward_reference(gate, up, grad)


def check_rope(device: torch.device, shapes: list[tuple[int, int, int, int, int]], timed: int) -> list[dict]:
    """(batch, q heads, k heads, tokens, head_dim) shapes; q and k head-major views of token-major rows, as the
    attention hands them, rotated together in one launch; cos and sin per row."""
    out = []
    gen = torch.Generator().manual_seed(0)
    for batch, q_heads, k_heads, tokens, head_dim in shapes:
        for dtype in (torch.bfloat16, torch.float32):
            q, k = (
                torch.randn(batch, tokens, heads, head_dim, generator=gen).to(dtype).transpose(1, 2)
                for heads in (q_heads, k_heads)
            )
            gq, gk = (
                torch.randn(batch, heads, tokens, head_dim, generator=gen).to(dtype) for heads in (q_heads, k_heads)
            )
            angles = torch.rand(batch, tokens, head_dim // 2, generator=gen).double() * 4096
            emb = torch.cat((angles, angles), dim=-1)
            cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
            ref = [rope_forward_reference(x, cos, sin) for x in (q, k)]
            ref += [rope_backward_reference(g, cos, sin) for g in (gq, gk)]
            qd, kd, gqd, gkd, cd, sd = (t.to(device) for t in (q, k, gq, gk, cos, sin))
            got = [*rope_triton((qd, kd), cd, sd, backward=False), *rope_triton((gqd, gkd), cd, sd, backward=True)]
            ok = all(same_bits(a.cpu(), b) for a, b in zip(got, ref, strict=True))
            row = {"check": "rope", "shape": [batch, q_heads, k_heads, tokens, head_dim], "dtype": str(dtype)[6:]}
            row["ok"] = ok
            if timed:
                twin = _median_us(partial(_rope_twin, qd, kd, gqd, gkd, cd, sd), device, timed)
                ops = _median_us(partial(_rope_ops, qd, kd, gqd, gkd, cd, sd), device, timed)
                row |= {"fwd_bwd_us_twin": twin, "fwd_bwd_us_torch_ops": ops}
            out.append(row)
    return out


def check_swiglu(device: torch.device, shapes: list[tuple[int, int]], timed: int) -> list[dict]:
    out = []
    gen = torch.Generator().manual_seed(0)
    for rows, cols in shapes:
        for dtype in (torch.bfloat16, torch.float32):
            gate, up, g = ((torch.randn(rows, cols, generator=gen) * 3).to(dtype) for _ in range(3))
            ref = (swiglu_forward_reference(gate, up), *swiglu_backward_reference(gate, up, g))
            gd, ud, dd = (t.to(device) for t in (gate, up, g))
            got = (swiglu_forward_triton(gd, ud), *swiglu_backward_triton(gd, ud, dd))
            ok = all(_close(a, b) for a, b in zip(got, ref, strict=True))
            row = {"check": "swiglu", "shape": [rows, cols], "dtype": str(dtype)[6:], "ok": ok}
            if timed:
                twin = _median_us(partial(_swiglu_twin, gd, ud, dd), device, timed)
                ops = _median_us(partial(_swiglu_ops, gd, ud, dd), device, timed)
                row |= {"fwd_bwd_us_twin": twin, "fwd_bwd_us_torch_ops": ops}
            out.append(row)
    return out


def _cast_product(m1: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
    return (m1 @ m2).float()


def check_widening_mm(device: torch.device, shapes: list[tuple[int, int, int]], timed: int) -> list[dict]:
    """A's gradient product (r x tokens @ tokens x in) and B's (out x tokens @ tokens x r), bf16 in, fp32 out."""
    out = []
    gen = torch.Generator().manual_seed(0)
    for m, k, n in shapes:
        m1 = torch.randn(k, m, generator=gen).to(torch.bfloat16).t()  # a transposed view, as du.t() and g.t()
        m2 = torch.randn(k, n, generator=gen).to(torch.bfloat16)
        exact = m1.double() @ m2.double()
        ref = _cast_product(m1, m2)
        d1, d2 = m1.to(device), m2.to(device)
        got = widening_mm(d1, d2, torch.float32).cpu()
        err_ref, err_got = ((t.double() - exact).abs().max().item() for t in (ref, got))
        path = "out_dtype" if widening_mm_is_one_launch(device, torch.bfloat16, torch.float32) else "cast"
        ok = got.dtype == torch.float32 and err_got <= err_ref
        row = {"check": "widening_mm", "shape": [m, k, n], "path": path, "ok": ok}
        row |= {"max_err_got": err_got, "max_err_reference": err_ref}
        if timed:
            row["us_widening"] = _median_us(partial(widening_mm, d1, d2, torch.float32), device, timed)
            row["us_product_then_cast"] = _median_us(partial(_cast_product, d1, d2), device, timed)
        out.append(row)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    big = device.type == "cuda"
    t0 = time.perf_counter()
    shapes = [(4096, 14336), (1536, 576), (7, 4097)] if big else [(64, 256), (7, 97)]
    checks = check_dequant(device, shapes)
    checks += check_adam8bit(device, 40 * BS + 77 if not big else 4096 * 1024 + 77, steps=5 if big else 3)
    small = [3000, 5000, 7001, 2048]  # updated together in one call when unpaged
    checks += check_paging(device, small if not big else [2**20, 3 * 2**20, 2**21 + 5, *small], steps=4)
    checks += check_adamw32_vs_torch(device, [*small, 2**20 + 3], steps=5)
    checks += check_rmsnorm(device, [(754, 576), (754, 4096)] if big else [(6, 576), (3, 100)], timed=200 if big else 3)
    checks += check_rope(
        device, [(8, 9, 3, 94, 64), (8, 32, 8, 94, 128)] if big else [(2, 3, 1, 7, 64)], timed=200 if big else 3
    )
    checks += check_swiglu(
        device, [(754, 1536), (754, 14336)] if big else [(6, 1536), (3, 101)], timed=200 if big else 3
    )
    checks += check_widening_mm(
        device, [(16, 754, 576), (576, 754, 16), (16, 754, 4096)] if big else [(16, 37, 64)], timed=200 if big else 3
    )
    where = torch.cuda.get_device_name(device) if big else f"cpu, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"
    report = {
        "device": where,
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - t0, 1),
        "checks": checks,
        "all_ok": all(c["ok"] for c in checks),
    }
    for c in checks:
        detail = {k: v for k, v in c.items() if k not in ("check", "ok")}
        print(f"{'PASS' if c['ok'] else 'FAIL'} {c['check']:<15} {detail}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if report["all_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
