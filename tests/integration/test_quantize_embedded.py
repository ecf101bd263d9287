"""Our NF4 artifact of SmolLM2 vs transformers' own bitsandbytes 4-bit load of the 16-bit model."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.integration


def test_smollm2_artifact_loads_in_transformers_with_identical_logits(embedded_quantized) -> None:
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora_pipeline.kernels.formats.bnb_loader import load_4bit_model

    artifacts, _ = embedded_quantized
    qdir = artifacts / "quantize" / "model"
    stats = json.loads((artifacts / "quantize" / "manifest.json").read_text())["metrics"]
    assert stats["n_quantized"] == 210 and 4.1 < stats["bits_per_weight"] < 4.2
    ids = torch.tensor([[1, 9690, 28, 314, 253, 4053, 30, 2, 1, 504, 2364, 282, 4649, 314, 7042]])

    ours_in_hf = AutoModelForCausalLM.from_pretrained(qdir, dtype=torch.bfloat16, device_map="cpu")
    theirs = AutoModelForCausalLM.from_pretrained(
        artifacts / "prepare" / "model",
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        ),
        dtype=torch.bfloat16,
        device_map="cpu",
    )
    # snapshot bnb's bytes before any inference (bnb's CPU eval path repacks them in place)
    theirs_sd = {k: v.clone() for k, v in theirs.state_dict().items() if "q_proj.weight" in k}
    ours_sd = load_file(qdir / "model.safetensors")
    for k, v in theirs_sd.items():
        assert torch.equal(v.cpu(), ours_sd[k]), k
    with torch.no_grad():
        a = ours_in_hf(ids).logits
        b = theirs(ids).logits
    assert torch.equal(a, b), (a.float() - b.float()).abs().max()

    mine = load_4bit_model(qdir, compute_dtype=torch.bfloat16)
    with torch.no_grad():
        c = mine(ids).logits.float()
    # same dequantized weights; only bf16 summation order differs from bnb's CPU kernel, over 30 layers
    diff = (c - a.float()).abs()
    assert diff.mean() < 0.35, diff.mean()  # logits span ~±30; measured 0.23
    assert (c.argmax(-1) == a.argmax(-1)).float().mean() >= 0.9
