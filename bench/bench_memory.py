"""Peak host memory of quantize, merge and GPTQ on random Llama models of two sizes, before and after streaming.

    .venv/bin/python bench/bench_memory.py [--sizes 0.5B 1.5B] [--before f571cb7] [--work DIR]

Each model is written as bf16 safetensors shards of at most 512 MiB (hub models ship 5 GB shards; at these sizes
that would be one file, and the point is to see whether memory follows a shard or the model). Every operation runs
in a child process of its own, which reports its peak RSS (``VmHWM``) and its RSS after the imports (the
constant every run pays); the table gives peak / model bytes side by side for the code at ``--before`` (checked out
into a git worktree) and this checkout. Operations, called as their stages call them:

* quantize — NF4 + double quant into the bnb folder layout (``save_4bit_checkpoint``);
* merge — a rank-16 LoRA on all seven projections folded into the bf16 weights (before: the old stage body's
  ``read_base`` + ``merge_state_dict`` + one ``save_file``; after: ``merge_shards``);
* gptq — 4-bit g128 GPTQ on 8 × 256 calibration tokens (``write_gptq_checkpoint``).

Writes bench/results/memory.json and prints the markdown table. Takes about 25 minutes on 2 cores (GPTQ
dominates). Needs about 12 GB of disk under ``--work``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARD_BYTES = 512 * 2**20
SIZES = {  # Llama shapes (32k vocab, untied head, GQA 4:1) of about 0.5B and 1.5B parameters
    "0.5B": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16},
    "1.5B": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 32},
    "smoke": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4},
}
OPS = ("quantize", "merge", "gptq")
RANK, SEED = 16, 0
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_random_llama(size: str, out: Path) -> int:
    """A random bf16 Llama of ``size`` as hub-style shards + index; returns the weight bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    shape = SIZES[size]
    heads = shape["num_attention_heads"]
    config = LlamaConfig(
        **shape, num_key_value_heads=heads // 4, vocab_size=32000, tie_word_embeddings=False, torch_dtype="bfloat16"
    )
    out.mkdir(parents=True)
    config.to_json_file(out / "config.json")
    gen = torch.Generator().manual_seed(SEED)
    h, i, kv = config.hidden_size, config.intermediate_size, config.hidden_size // 4
    shapes = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes |= {
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (config.vocab_size, h)}
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for key, s in shapes.items():
        t = torch.ones(s) if len(s) == 1 else torch.randn(s, generator=gen) * 0.02
        t = t.to(torch.bfloat16)
        if sizes[-1] and sizes[-1] + 2 * t.numel() > SHARD_BYTES:
            shards.append({})
            sizes.append(0)
        shards[-1][key] = t
        sizes[-1] += 2 * t.numel()
    weight_map = {}
    for k, shard in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, name)
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return sum(sizes)


def _deltas(model_dir: Path) -> dict:
    """A seeded rank-16 LoRA (A, B) for every projection, from the config alone."""
    import torch

    cfg = json.loads((model_dir / "config.json").read_text())
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    dims = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h)}
    dims |= {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    gen = torch.Generator().manual_seed(SEED)
    out = {}
    for n in range(cfg["num_hidden_layers"]):
        for p in PROJ:
            group = "self_attn" if p in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            o, k = dims[p]
            a, b = torch.randn(RANK, k, generator=gen) * 0.01, torch.randn(o, RANK, generator=gen) * 0.01
            out[f"model.layers.{n}.{group}.{p}.weight"] = (a, b)
    return out


def _calibration() -> list:
    import torch

    gen = torch.Generator().manual_seed(SEED)
    return list(torch.randint(0, 32000, (8, 256), generator=gen).split(1))


def run_op(impl: str, op: str, model_dir: Path, out: Path) -> None:
    """The operation as the ``impl`` code's stage does it (``before``: the old module paths, put first on sys.path
    by the parent)."""
    import torch

    if op == "quantize":
        if impl == "before":
            from kernels.checkpoint4bit import save_4bit_checkpoint
        else:
            from qlora_pipeline.kernels.formats.bnb_loader import save_4bit_checkpoint
        save_4bit_checkpoint(model_dir, out)
    elif op == "merge":
        deltas = _deltas(model_dir)
        out.mkdir(parents=True)
        if impl == "before":
            from safetensors.torch import save_file

            from stages.merge import merge_state_dict, read_base

            merged, _ = merge_state_dict(read_base(model_dir), deltas, 2.0, torch.bfloat16)
            save_file(merged, str(out / "model.safetensors"), metadata={"format": "pt"})
        else:
            from qlora_pipeline.stages.merge import merge_shards

            merge_shards(model_dir, out, deltas, 2.0, torch.bfloat16)
    else:
        if impl == "before":
            from kernels.gptq_model import write_gptq_checkpoint
        else:
            from qlora_pipeline.kernels.formats.gptq_folder import write_gptq_checkpoint
        write_gptq_checkpoint(model_dir, out, _calibration(), bits=4, group_size=128)


def _status_kib(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, from /proc: ``ru_maxrss`` would not do, Linux carries it
    over from the parent across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (this benchmark needs Linux)")


def child(impl: str, op: str, model_dir: Path, out: Path, root: Path) -> None:
    sys.path.insert(0, str(root))
    if impl == "after":
        sys.path.insert(0, str(ROOT))
        from bench.checkout import ensure_importable

        ensure_importable()
    import torch  # noqa: F401 - the imports every stage pays, before the baseline is read
    import transformers.models.llama.modeling_llama  # noqa: F401

    baseline = _status_kib("VmRSS")
    t0 = time.perf_counter()
    run_op(impl, op, model_dir, out)
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak_bytes": peak * 1024, "baseline_bytes": baseline * 1024, "seconds": round(seconds, 1)}))


def measure(impl: str, op: str, model_dir: Path, work: Path, root: Path) -> dict:
    out = work / f"{op}-{impl}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--child", impl, op, str(model_dir), str(out), str(root)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env={"TQDM_DISABLE": "1"} | _env())
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"{impl} {op} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def table(rows: list[dict]) -> str:
    gib = 2**30
    lines = [
        "| model | weights | shards | op | before peak | before peak/model | after peak | after peak/model "
        "| after (peak − imports)/model |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b, a, m = r["before"], r["after"], r["model_bytes"]
        lines.append(
            f"| {r['size']} | {m / gib:.2f} GiB | {r['shards']} | {r['op']} | {b['peak_bytes'] / gib:.2f} GiB "
            f"| {b['peak_bytes'] / m:.2f} | {a['peak_bytes'] / gib:.2f} GiB | {a['peak_bytes'] / m:.2f} "
            f"| {(a['peak_bytes'] - a['baseline_bytes']) / m:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["0.5B", "1.5B"], choices=list(SIZES))
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    ap.add_argument("--before", default="f571cb7", help="git revision measured as 'before'")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the other rows of bench/results/memory.json")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-memory-"))
    before_root = work / "before-checkout"
    if not before_root.exists():
        git = ["git", "-C", str(ROOT), "worktree"]
        subprocess.run([*git, "add", "--detach", str(before_root), args.before], check=True)
    rows = []
    try:
        for size in args.sizes:
            model_dir = work / f"llama-{size}"
            if not model_dir.exists():
                write_random_llama(size, model_dir)
            model_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
            shards = len(list(model_dir.glob("*.safetensors")))
            for op in args.ops:
                row = {"size": size, "op": op, "model_bytes": model_bytes, "shards": shards}
                for impl in ("before", "after"):
                    row[impl] = measure(impl, op, model_dir, work, before_root if impl == "before" else ROOT)
                    print(size, op, impl, row[impl], flush=True)
                rows.append(row)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before_root)], check=False)
    out = ROOT / "bench" / "results" / "memory.json"
    kept = json.loads(out.read_text())["rows"] if args.keep and out.exists() else []
    measured = {(r["size"], r["op"]) for r in rows}
    rows = [r for r in kept if (r["size"], r["op"]) not in measured] + rows
    rows.sort(key=lambda r: (list(SIZES).index(r["size"]), OPS.index(r["op"])))
    result = {"machine": platform.processor() or platform.machine(), "before": args.before, "rows": rows}
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(rows))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], Path(sys.argv[4]), Path(sys.argv[5]), Path(sys.argv[6]))
    else:
        main()
