"""The 16-bit LoRA baseline and LoftQ through the stages: same loop and data, the gap reported, the LoftQ start used
by train, merged into the base it was trained against, and evaluated at step 0."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from qlora_pipeline.kernels.formats.bnb_folder import load_nf4_state_dict
from qlora_pipeline.kernels.formats.peft_adapter import lora_weight_pairs
from qlora_pipeline.kernels.lora import lora_modules, lora_scaling
from qlora_pipeline.kernels.nf4 import dequantize_nf4
from qlora_pipeline.stages import evaluate, merge, prepare, quantize, train
from qlora_pipeline.stages.contract.params import TrainParams, parse_params
from qlora_pipeline.stages.lm import lora16
from qlora_pipeline.stages.train import build_model
from tests import tiny

TRAIN = {"batch_size": 4, "max_steps": 6, "learning_rate": 1e-2, "lora_r": 4, "lora_alpha": 8, "warmup_ratio": 0.0}
EVAL = {"batch_size": 4, "num_generations": 1, "max_new_tokens": 4}


def run_until_evaluate(tmp: Path, model_dir: Path, data: Path, loftq_iters: int, baseline: bool | str):
    p = parse_params(
        tiny.params_for(
            tmp,
            model_dir,
            data,
            quantize={"loftq_iters": loftq_iters},
            train={**TRAIN, "lora16_baseline": baseline},
            evaluate=EVAL,
        )
    )
    return p, {s.STAGE: s.run(p) for s in (prepare, quantize, train, merge, evaluate)}


def test_lora16_baseline_trains_on_the_same_batches_and_evaluate_reports_the_gap(
    tmp_path: Path, tiny_llama_dir: Path, qa_jsonl: Path
) -> None:
    peft = pytest.importorskip("peft")
    _, m = run_until_evaluate(tmp_path, tiny_llama_dir, qa_jsonl, 0, "auto")  # auto: the tiny base is small
    art = tmp_path / "artifacts" / "train"
    base16 = m["train"].metrics["lora16"]
    assert base16["trained"] and base16["steps"] == TRAIN["max_steps"] and base16["why"].startswith("on: auto")
    qlora_log = json.loads((art / "train_log.json").read_text())
    lora16_log = json.loads((art / "train_log_lora16.json").read_text())
    # the same loop over the same batches: identical token counts every step, losses apart only by the 4-bit base
    assert [e["tokens"] for e in lora16_log] == [e["tokens"] for e in qlora_log]
    assert lora16_log[-1]["loss"] < lora16_log[0]["loss"]
    assert 0 < abs(lora16_log[0]["loss"] - qlora_log[0]["loss"]) < 0.1
    ev = m["evaluate"].metrics
    assert {"lora16", "nf4_adapter", "base_16bit"} <= set(ev["models"]) and "loftq_start" not in ev["models"]
    report = (tmp_path / "artifacts" / "evaluate" / "report.md").read_text()
    gap_line = f"QLoRA − 16-bit LoRA (same adapter, data order, steps and seed): **{ev['qlora_minus_lora16']:+.4f}"
    assert gap_line in report
    gap = ev["models"]["nf4_adapter"]["loss"] - ev["models"]["lora16"]["loss"]
    assert ev["qlora_minus_lora16"] == pytest.approx(gap, abs=2e-6)
    assert ev["models"]["lora16"]["loss"] < ev["models"]["base_16bit"]["loss"]
    # the baseline adapter is an ordinary PEFT adapter for the 16-bit base
    ids = torch.tensor([[1, 9, 40, 77, 120, 5, 2, 33]])
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "artifacts" / "prepare" / "model", dtype=torch.float32)
    with torch.no_grad():
        plain = base(ids).logits
        tuned = peft.PeftModel.from_pretrained(base, art / lora16.ADAPTER).eval()(ids).logits
    assert (tuned - plain).abs().max() > 1e-3


def test_baseline_decision(tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert not lora16.decide(TrainParams(lora16_baseline=False), tiny_llama_dir, 1).runs
    assert "nproc" in lora16.decide(TrainParams(lora16_baseline=True), tiny_llama_dir, 2).why
    monkeypatch.setattr(lora16, "AUTO_MAX_WEIGHT_BYTES", 1000)
    off = lora16.decide(TrainParams(), tiny_llama_dir, 1)
    assert not off.runs and "lora16_baseline: true" in off.why
    assert lora16.decide(TrainParams(lora16_baseline=True), tiny_llama_dir, 1).runs


def test_loftq_run_starts_from_loftq_and_merges_into_its_base(
    tmp_path: Path, tiny_llama_dir: Path, qa_jsonl: Path
) -> None:
    p, m = run_until_evaluate(tmp_path, tiny_llama_dir, qa_jsonl, 2, False)
    art = tmp_path / "artifacts"
    loftq = m["quantize"].metrics["loftq"]
    assert loftq["projections"] == 14 and loftq["worst_ratio_loftq_over_plain"] < 1
    start = art / "quantize" / "loftq_adapter"
    pairs = lora_weight_pairs(load_file(start / "adapter_model.safetensors"))
    # train starts from the LoftQ pair, not from PEFT's random A and zero B
    model, _ = build_model(art / "quantize" / "model", p.train, torch.device("cpu"), torch.float32)
    for name, layer in lora_modules(model).items():
        a, b = pairs[f"{name}.weight"]
        assert torch.equal(layer.lora_A.detach(), a) and torch.equal(layer.lora_B.detach(), b)
    assert m["train"].metrics["lora16"] == {"trained": False, "why": "off: train.lora16_baseline is false"}
    # merge adds the trained adapter to the dequantized LoftQ NF4 weight (W + BA would count W − Q twice)
    assert m["merge"].metrics["base"] == "loftq_dequantized_nf4"
    nf4, _ = load_nf4_state_dict(load_file(art / "quantize" / "model" / "model.safetensors"))
    trained = lora_weight_pairs(load_file(art / "train" / "adapter" / "adapter_model.safetensors"))
    merged = load_file(art / "merge" / "model" / "model.safetensors")
    s = lora_scaling(TRAIN["lora_r"], TRAIN["lora_alpha"])
    for key, (a, b) in trained.items():
        want = (dequantize_nf4(nf4[key.removesuffix(".weight")], torch.float32) + s * (b @ a)).to(torch.bfloat16)
        assert torch.equal(merged[key], want), key
    untouched = "model.layers.0.input_layernorm.weight"
    assert torch.equal(merged[untouched], load_file(art / "prepare" / "model" / "model.safetensors")[untouched])
    ev = m["evaluate"].metrics
    assert "loftq_start" in ev["models"] and "lora16" not in ev["models"] and "qlora_minus_lora16" not in ev
    assert ev["loftq_start_minus_16bit"] == pytest.approx(
        ev["models"]["loftq_start"]["loss"] - ev["models"]["base_16bit"]["loss"], abs=2e-6
    )
