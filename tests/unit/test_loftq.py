"""LoftQ: a lower step-0 error than plain NF4 on every projection, the same NF4 layout, an adapter peft loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_pipeline.kernels.formats.bnb_loader import load_4bit_model, save_4bit_checkpoint
from qlora_pipeline.kernels.formats.peft_adapter import CONFIG_NAME, load_peft_adapter
from qlora_pipeline.kernels.loftq import loftq_init, low_rank
from qlora_pipeline.kernels.lora import inject_lora
from qlora_pipeline.kernels.nf4 import dequantize_nf4, quantize_nf4
from qlora_pipeline.stages.contract.params import TrainParams
from qlora_pipeline.stages.lm.lora_plan import LoftQCollector

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA = 4, 8.0


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x.float() - ref.float()) / torch.linalg.vector_norm(ref.float()))


def projections(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(model_dir / "model.safetensors")
    return {k.removesuffix(".weight"): v for k, v in tensors.items() if k.endswith("proj.weight")}


def test_loftq_beats_plain_nf4_on_every_projection(tiny_llama_dir: Path) -> None:
    weights = projections(tiny_llama_dir)
    assert len(weights) == 7 * 2  # the tiny Llama: 2 layers
    for name, w in weights.items():
        init = loftq_init(w, R, ALPHA / R, iters=4)
        plain = quantize_nf4(w)
        plain_err = rel(dequantize_nf4(plain, torch.float32), w)
        # the step-0 model weight Q + s·B·A, rebuilt from the stored pieces alone
        step0 = dequantize_nf4(init.nf4, torch.float32) + low_rank(init.lora_A, init.lora_B, ALPHA / R)
        err = rel(step0, w)
        assert init.plain_nf4_error == pytest.approx(plain_err, rel=1e-6)
        assert err == pytest.approx(init.error, rel=1e-5)
        assert err < 0.97 * plain_err, name  # a rank-4 SVD of the residual takes a real share of it
        assert init.lora_A.shape == (R, w.shape[1]) and init.lora_B.shape == (w.shape[0], R)
        assert init.nf4.shape == w.shape and init.nf4.blocksize == 64 and init.nf4.double_quant


def test_one_iteration_keeps_plain_nf4_bytes_and_more_iterations_do_not_lose() -> None:
    g = torch.Generator().manual_seed(0)
    # a weight with a low-rank structure, as trained weights have: LoftQ's later iterations then help
    w = torch.randn(96, 4, generator=g) @ torch.randn(4, 160, generator=g) + 0.3 * torch.randn(96, 160, generator=g)
    w = w.bfloat16()
    one = loftq_init(w, 4, 2.0, iters=1)
    plain = quantize_nf4(w)
    assert torch.equal(one.nf4.packed, plain.packed) and torch.equal(one.nf4.absmax, plain.absmax)
    many = loftq_init(w, 4, 2.0, iters=5)
    assert len(many.errors) == 5 and many.errors[0] == pytest.approx(one.error)
    assert many.error <= one.error < one.plain_nf4_error
    with pytest.raises(ValueError, match="rank 200"):
        loftq_init(w, 200, 2.0)


def loftq_folder(src: Path, out: Path) -> LoftQCollector:
    t = TrainParams(lora_r=R, lora_alpha=ALPHA, target_modules=PROJ)
    collector = LoftQCollector.of(t, json.loads((src / "config.json").read_text()), iters=3, blocksize=64)
    assert collector is not None
    save_4bit_checkpoint(src, out / "model", quantizer=collector)
    collector.write_adapter(out / "adapter", "tiny-llama-loftq")
    return collector


def test_loftq_folder_loads_in_transformers_bnb_and_peft(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """The LoftQ base is an ordinary bnb-layout NF4 folder and the starting adapter an ordinary PEFT adapter:
    transformers+bitsandbytes+peft load them and compute what our stack computes, and base + adapter is closer to
    the 16-bit model than plain NF4 is."""
    pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    collector = loftq_folder(tiny_llama_dir, tmp_path)
    assert set(collector.errors) == set(projections(tiny_llama_dir))
    summary = collector.summary()
    assert summary["projections"] == 14 and summary["worst_ratio_loftq_over_plain"] < 1
    cfg = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["target_modules"]) == (R, ALPHA, sorted(PROJ))

    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)  # bnb, bf16 compute
        bnb_base = base(ids).logits
        theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(ids).logits
        ours_model = load_4bit_model(tmp_path / "model", compute_dtype=torch.float32)
        inject_lora(ours_model, PROJ, r=R, alpha=ALPHA, dropout=0.0)
        load_peft_adapter(ours_model, tmp_path / "adapter")
        ours = ours_model.eval()(ids).logits
        plain_dir = tmp_path / "plain"
        save_4bit_checkpoint(tiny_llama_dir, plain_dir)
        plain = load_4bit_model(plain_dir, compute_dtype=torch.float32).eval()(ids).logits
    # bnb computes in bf16 (the folder's compute dtype), ours here in fp32: equal up to bf16 rounding. The logits'
    # dtype differs by transformers version (the head's weight dtype: 5.23 gives bnb's in bf16, 5.17 in fp32)
    theirs, bnb_base, ours, plain = (t.float() for t in (theirs, bnb_base, ours, plain))
    torch.testing.assert_close(theirs, ours, atol=2e-2 * full.abs().max().item(), rtol=0)
    assert rel(theirs, full) < 0.97 * rel(bnb_base, full)  # peft really applied the LoftQ start
    assert rel(ours, full) < 0.97 * rel(plain, full)
