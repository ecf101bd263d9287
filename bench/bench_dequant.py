"""Dequant time and effective bandwidth of NF4 + double quant -> bf16: ours vs bitsandbytes, same run.

On CUDA: a 4096x14336 weight (a 7B/8B MLP projection), Triton one-launch kernels (1-D, and the 2-D tile kernel at
several blocks a program, with the 16-entry table and with the byte-pair table) vs the torch reference vs bnb
(if installed), the L2 cache flushed before every timed call (a 256 MiB write, more than the H200's 60 MB L2),
and the device's copy bandwidth measured in the same run (a 1 GiB device-to-device copy, bytes read + written),
so each kernel's bandwidth is also given as a share of what the memory really delivers. On CPU there is no Triton
(only its slow interpreter) and the torch reference is the CPU path, so it compares the torch reference with
bnb's CPU kernel on a 1024x3584 weight (1/16 of the size) and says so. Effective bandwidth = (bytes read + bytes
written) / time: packed codes, uint8 absmax, nested absmax and both code tables read once, the bf16 output
written once. Writes bench/results/dequant.json (CPU) or bench/results/gpu-dequant.json (CUDA), or --out.

    python bench/bench_dequant.py [--repeats 50] [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from checkout import ensure_importable

ensure_importable()

from qlora_pipeline.kernels.formats.bnb_folder import nf4_to_state_dict  # noqa: E402
from qlora_pipeline.kernels.nf4 import NF4Weight, dequantize_nf4, quantize_nf4  # noqa: E402

GPU_SHAPE = (4096, 14336)
CPU_SHAPE = (1024, 3584)


def traffic_bytes(nf4: NF4Weight, out_dtype: torch.dtype) -> int:
    """Minimum bytes a dequant must move: every quantized byte read once, every output written once."""
    read = nf4.packed.numel() + nf4.absmax.numel() * nf4.absmax.element_size() + 16 * 4
    if nf4.double_quant:
        read += nf4.nested_absmax.numel() * 4 + nf4.nested_code.numel() * 4
    return read + nf4.numel * torch.empty(0, dtype=out_dtype).element_size()


TILE_BLOCKS = (32, 64, 128, 256)
PAIR_TILE_BLOCKS = (64, 128, 256)
L2_FLUSH_BYTES = 256 * 2**20
COPY_BYTES = 2**30


def time_all(fns: dict[str, Callable[[], torch.Tensor]], repeats: int, cuda: bool) -> dict[str, float]:
    """Median ms per call of each function; calls alternate between them so background load hits all alike.
    On CUDA the L2 is flushed before each timed call, so every kernel reads its inputs from device memory."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda") if cuda else None
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if cuda:
                assert flush is not None
                flush.zero_()
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


def copy_bandwidth_gb_s(repeats: int = 10) -> float:
    """Device-to-device copy of 1 GiB, (bytes read + bytes written) / median time: the memory's real ceiling."""
    src = torch.empty(COPY_BYTES // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = time_all({"copy": lambda: dst.copy_(src)}, repeats, cuda=True)["copy"]
    return 2 * src.numel() * src.element_size() / (ms / 1000) / 1e9


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
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from qlora_pipeline.stages.contract.device import resolve_device

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    if args.out is None:
        args.out = Path(__file__).parent / "results" / ("gpu-dequant.json" if cuda else "dequant.json")
    shape = GPU_SHAPE if cuda else CPU_SHAPE
    out_dtype = torch.bfloat16
    torch.manual_seed(0)
    w = (torch.randn(shape, device=device) * 0.02).to(out_dtype)
    nf4 = quantize_nf4(w)
    moved = traffic_bytes(nf4, out_dtype)
    ref_out = dequantize_nf4(nf4, out_dtype)

    candidates: dict[str, Callable[[], torch.Tensor]] = {"torch_reference": lambda: dequantize_nf4(nf4, out_dtype)}
    if cuda:
        from qlora_pipeline.kernels.nf4_triton import dequantize_nf4_triton

        candidates["triton_1d"] = lambda: dequantize_nf4_triton(nf4, out_dtype, None)
        for blocks in TILE_BLOCKS:  # the 2-D tile kernel, several quantization blocks a program
            candidates[f"triton_tile{blocks}"] = lambda b=blocks: dequantize_nf4_triton(nf4, out_dtype, b)
        for blocks in PAIR_TILE_BLOCKS:  # the same, a byte decoded by one gather from the byte-pair table
            candidates[f"triton_pairs{blocks}"] = lambda b=blocks: dequantize_nf4_triton(nf4, out_dtype, b, pairs=True)
    bnb_fn = bnb_dequant(nf4)
    if bnb_fn is not None:
        candidates["bnb"] = bnb_fn

    results: dict[str, dict] = {}
    copy_gb_s = copy_bandwidth_gb_s() if cuda else None
    for name, ms in time_all(candidates, args.repeats, cuda).items():
        fn = candidates[name]
        same = torch.equal(fn().view(torch.int16), ref_out.view(torch.int16))
        gb_s = moved / (ms / 1000) / 1e9
        results[name] = {"ms": ms, "us": ms * 1000, "GB_per_s": gb_s, "bit_exact_vs_reference": same}
        if copy_gb_s:
            results[name]["percent_of_copy_bandwidth"] = 100 * gb_s / copy_gb_s
    base = "bnb" if "bnb" in results else "torch_reference"
    for r in results.values():
        r[f"speedup_vs_{base}"] = results[base]["ms"] / r["ms"]

    device_name = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
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
        "l2_flushed_between_runs": cuda,
        "copy_bandwidth_GB_per_s": copy_gb_s,
        "note": note,
        "results": results,
        "torch": torch.__version__,
    }
    print(note)
    if copy_gb_s:
        print(f"device copy bandwidth: {copy_gb_s:.0f} GB/s (1 GiB copy, read + write)")
    for name, r in results.items():
        share = f"  {r['percent_of_copy_bandwidth']:5.1f}% of copy" if "percent_of_copy_bandwidth" in r else ""
        print(
            f"{name:>16}: {r['us']:9.1f} us  {r['GB_per_s']:8.1f} GB/s{share}  "
            f"x{r[f'speedup_vs_{base}']:.2f} vs {base}  bit-exact={r['bit_exact_vs_reference']}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
