"""Dequant time and effective bandwidth of NF4 + double quant -> bf16: ours vs bitsandbytes, same run.

On CUDA: a 4096x14336 weight (a 7B/8B MLP projection), Triton one-launch kernel vs the torch reference vs bnb
(if installed). On CPU there is no Triton (only its slow interpreter) and the torch reference is the CPU
path, so it compares the torch reference with bnb's CPU kernel on a 1024x3584 weight (1/16 of the size) and
says so. Effective bandwidth = (bytes read + bytes written) / time: packed codes, uint8 absmax, nested absmax
and both code tables read once, the bf16 output written once. Writes bench/results/dequant.json.

    python bench/bench_dequant.py [--repeats 50]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.bnb_format import nf4_to_state_dict
from kernels.nf4 import NF4Weight, dequantize_nf4, quantize_nf4

GPU_SHAPE = (4096, 14336)
CPU_SHAPE = (1024, 3584)


def traffic_bytes(nf4: NF4Weight, out_dtype: torch.dtype) -> int:
    """Minimum bytes a dequant must move: every quantized byte read once, every output written once."""
    read = nf4.packed.numel() + nf4.absmax.numel() * nf4.absmax.element_size() + 16 * 4
    if nf4.double_quant:
        read += nf4.nested_absmax.numel() * 4 + nf4.nested_code.numel() * 4
    return read + nf4.numel * torch.empty(0, dtype=out_dtype).element_size()


def time_all(fns: dict[str, Callable[[], torch.Tensor]], repeats: int, cuda: bool) -> dict[str, float]:
    """Median ms per call of each function; calls alternate between them so background load hits all alike."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times[name].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def bnb_dequant(nf4: NF4Weight) -> Callable[[], torch.Tensor] | None:
    """bnb's dequantize_4bit on the same bytes, or None when bitsandbytes is not installed."""
    try:
        import bitsandbytes.functional as bnbF
    except ImportError:
        return None
    tensors = nf4_to_state_dict("", nf4)
    packed = tensors.pop("weight")
    state = bnbF.QuantState.from_dict({k.removeprefix("weight."): v for k, v in tensors.items()}, nf4.device)
    return lambda: bnbF.dequantize_4bit(packed, state)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "dequant.json")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    shape = GPU_SHAPE if cuda else CPU_SHAPE
    out_dtype = torch.bfloat16
    torch.manual_seed(0)
    w = (torch.randn(shape, device=device) * 0.02).to(out_dtype)
    nf4 = quantize_nf4(w)
    moved = traffic_bytes(nf4, out_dtype)
    ref_out = dequantize_nf4(nf4, out_dtype)

    candidates: dict[str, Callable[[], torch.Tensor]] = {"torch_reference": lambda: dequantize_nf4(nf4, out_dtype)}
    if cuda:
        from kernels.nf4_triton import dequantize_nf4_triton

        candidates["triton"] = lambda: dequantize_nf4_triton(nf4, out_dtype)
    bnb_fn = bnb_dequant(nf4)
    if bnb_fn is not None:
        candidates["bnb"] = bnb_fn

    results: dict[str, dict] = {}
    for name, ms in time_all(candidates, args.repeats, cuda).items():
        fn = candidates[name]
        same = torch.equal(fn().view(torch.int16), ref_out.view(torch.int16))
        results[name] = {"ms": ms, "GB_per_s": moved / (ms / 1000) / 1e9, "bit_exact_vs_reference": same}
    base = "bnb" if "bnb" in results else "torch_reference"
    for r in results.values():
        r[f"speedup_vs_{base}"] = results[base]["ms"] / r["ms"]

    device_name = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
    note = (
        "CUDA: Triton one-launch kernel vs torch reference vs bnb"
        if cuda
        else f"CPU run: no Triton kernel (interpreter only), torch reference vs bnb at {shape[0]}x{shape[1]}, "
        f"1/16 of the {GPU_SHAPE[0]}x{GPU_SHAPE[1]} GPU size"
    )
    report = {
        "device": device_name,
        "shape": list(shape),
        "out_dtype": "bfloat16",
        "blocksize": 64,
        "double_quant": True,
        "bytes_moved": moved,
        "note": note,
        "results": results,
        "torch": torch.__version__,
    }
    print(note)
    for name, r in results.items():
        print(
            f"{name:>16}: {r['ms']:8.3f} ms  {r['GB_per_s']:8.1f} GB/s  "
            f"x{r[f'speedup_vs_{base}']:.2f} vs {base}  bit-exact={r['bit_exact_vs_reference']}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
