"""PEFT adapter folders: ours load in peft, peft's load in ours, same logits; bad folders fail in one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qlora_pipeline.kernels.formats.peft_adapter import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    load_peft_adapter,
    read_adapter_config,
    save_peft_adapter,
)
from qlora_pipeline.kernels.lora import inject_lora, lora_modules
from tests import tiny

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
# safetensors stores keys sorted, so the first offending key of a full adapter is layer 0's down_proj A
DOWN_A = "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"


def tiny_llama(seed: int = 0) -> nn.Module:
    """hidden 64, intermediate 128, 2 layers, 4 heads, 2 kv heads, vocab 384, fp32."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny.tiny_config("llama", vocab_size=384)).eval()


def logits(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 384, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits


def randomized(model: nn.Module, seed: int = 3) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def our_adapter(tmp: Path, r: int = 8, alpha: float = 16, use_rslora: bool = False) -> tuple[nn.Module, Path]:
    model = tiny_llama()
    inject_lora(model, ALL_PROJ, r=r, alpha=alpha, dropout=0.05, use_rslora=use_rslora)
    randomized(model)
    out = tmp / "adapter"
    save_peft_adapter(model, out, "tiny-llama", ALL_PROJ, r=r, alpha=alpha, dropout=0.05, use_rslora=use_rslora)
    return model, out


@pytest.mark.parametrize("use_rslora", [False, True])
def test_our_adapter_loads_in_peft_with_same_logits(tmp_path: Path, use_rslora: bool) -> None:
    peft = pytest.importorskip("peft")
    ours, adapter = our_adapter(tmp_path, use_rslora=use_rslora)
    cfg = json.loads((adapter / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["use_rslora"]) == (8, 16, 0.05, use_rslora)
    assert cfg["target_modules"] == sorted(ALL_PROJ) and cfg["base_model_name_or_path"] == "tiny-llama"
    tensors = load_file(adapter / WEIGHTS_NAME)
    assert len(tensors) == 28 and tensors[Q_A].shape == (8, 64) and tensors[Q_A].dtype == torch.float32

    peft_model = peft.PeftModel.from_pretrained(tiny_llama(), adapter).eval()
    layer = peft_model.base_model.model.model.layers[1].mlp.down_proj
    assert layer.scaling["default"] == pytest.approx(16 / math.sqrt(8) if use_rslora else 2.0)
    got, want = logits(peft_model), logits(ours.eval())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (want - logits(tiny_llama())).abs().max() > 1e-2


def test_peft_adapter_loads_in_ours_with_same_logits(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=12, lora_dropout=0.0, target_modules=ALL_PROJ, task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(tiny_llama(), cfg)
    randomized(peft_model).eval()
    peft_model.save_pretrained(tmp_path / "peft")

    spec = read_adapter_config(tmp_path / "peft")
    assert (spec.r, spec.alpha, spec.use_rslora, spec.scaling) == (4, 12.0, False, 3.0)
    ours = tiny_llama()
    inject_lora(ours, list(spec.target_modules), spec.r, spec.alpha, spec.dropout, spec.use_rslora)
    load_peft_adapter(ours, tmp_path / "peft")
    torch.testing.assert_close(logits(ours), logits(peft_model), atol=1e-5, rtol=0)
    # and the tensors are bit-identical to peft's
    a = peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert torch.equal(ours.get_submodule("model.layers.0.self_attn.q_proj").lora_A, a)


def test_round_trip_through_our_loader(tmp_path: Path) -> None:
    ours, adapter = our_adapter(tmp_path, r=8, alpha=16)
    fresh = tiny_llama()
    inject_lora(fresh, ALL_PROJ, r=8, alpha=16, dropout=0.0)
    load_peft_adapter(fresh, adapter)
    assert torch.equal(logits(fresh), logits(ours.eval()))


def _fresh(r: int = 8, alpha: float = 16, targets: list[str] = ALL_PROJ) -> nn.Module:
    model = tiny_llama()
    inject_lora(model, targets, r=r, alpha=alpha, dropout=0.0)
    return model


def _assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = {n: m.lora_A for n, m in lora_modules(model).items()}
    assert all(torch.equal(before[n], after[n]) for n in before), "a failed load must not change the model"


def _one_line(err: pytest.ExceptionInfo[ValueError]) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_missing_files(tmp_path: Path) -> None:
    model = _fresh()
    with pytest.raises(ValueError) as err:
        load_peft_adapter(model, tmp_path / "nowhere")
    assert _one_line(err).startswith(f"missing {CONFIG_NAME} in ")
    _, adapter = our_adapter(tmp_path)
    (adapter / WEIGHTS_NAME).unlink()
    with pytest.raises(ValueError) as err:
        load_peft_adapter(model, adapter)
    assert _one_line(err) == f"missing {WEIGHTS_NAME} in {adapter}"


def test_config_rank_differs_from_tensors(tmp_path: Path) -> None:
    _, adapter = our_adapter(tmp_path, r=8)
    cfg = json.loads((adapter / CONFIG_NAME).read_text())
    cfg["r"] = 4
    (adapter / CONFIG_NAME).write_text(json.dumps(cfg))
    model = _fresh(r=4, alpha=8)  # same scaling as the edited config, so the rank check is what fires
    before = {n: m.lora_A.clone() for n, m in lora_modules(model).items()}
    with pytest.raises(ValueError) as err:
        load_peft_adapter(model, adapter)
    msg = _one_line(err)
    assert msg.startswith(f"{CONFIG_NAME} says r=4 but base_model.model.model.layers.0.")
    assert "(8, " in msg and "rank 8" in msg
    _assert_untouched(model, before)


def test_config_targets_differ_from_tensors(tmp_path: Path) -> None:
    _, adapter = our_adapter(tmp_path)
    cfg = json.loads((adapter / CONFIG_NAME).read_text())
    cfg["target_modules"] = ["q_proj", "v_proj"]
    (adapter / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as err:
        load_peft_adapter(_fresh(targets=["q_proj", "v_proj"]), adapter)
    msg = _one_line(err)
    assert msg.startswith(f"adapter_model.safetensors has {DOWN_A} but 'model.layers.0.mlp.down_proj' is not in ")
    assert "not in adapter_config.json target_modules ['q_proj', 'v_proj']" in msg


def test_shape_mismatch_names_key_and_both_shapes(tmp_path: Path) -> None:
    _, adapter = our_adapter(tmp_path)
    tensors = load_file(adapter / WEIGHTS_NAME)
    tensors[Q_A] = torch.zeros(8, 32)  # rank still 8, but q_proj takes 64 features
    save_file(tensors, adapter / WEIGHTS_NAME, metadata={"format": "pt"})
    model = _fresh()
    before = {n: m.lora_A.clone() for n, m in lora_modules(model).items()}
    with pytest.raises(ValueError) as err:
        load_peft_adapter(model, adapter)
    assert _one_line(err) == f"shape mismatch for {Q_A}: adapter has (8, 32), model expects (8, 64)"
    _assert_untouched(model, before)


def test_model_rank_differs_from_adapter(tmp_path: Path) -> None:
    _, adapter = our_adapter(tmp_path, r=8, alpha=16)
    with pytest.raises(ValueError) as err:
        load_peft_adapter(_fresh(r=4, alpha=8), adapter)  # same scaling 2.0, other rank
    assert _one_line(err) == f"shape mismatch for {DOWN_A}: adapter has (8, 128), model expects (4, 128)"
    with pytest.raises(ValueError) as err:
        load_peft_adapter(_fresh(r=8, alpha=8), adapter)
    assert "adapter scaling 2 (r=8, lora_alpha=16, use_rslora=False) differs" in _one_line(err)


def test_keys_for_modules_the_model_lacks(tmp_path: Path) -> None:
    _, adapter = our_adapter(tmp_path)
    model = _fresh(targets=["q_proj"])
    with pytest.raises(ValueError) as err:
        load_peft_adapter(model, adapter)
    msg = _one_line(err)
    assert msg == (
        f"adapter key {DOWN_A} is for 'model.layers.0.mlp.down_proj', a module the model has no LoRA layer for "
        "(model LoRA layers: model.layers.0.self_attn.q_proj, model.layers.1.self_attn.q_proj)"
    )


def test_adapter_missing_tensors_the_model_has(tmp_path: Path) -> None:
    model = tiny_llama()
    inject_lora(model, ["q_proj"], r=8, alpha=16, dropout=0.0)
    save_peft_adapter(model, tmp_path / "q", "tiny", ["q_proj"], r=8, alpha=16, dropout=0.0, use_rslora=False)
    with pytest.raises(ValueError) as err:
        load_peft_adapter(_fresh(targets=["q_proj", "v_proj"]), tmp_path / "q")
    assert _one_line(err).startswith("adapter lacks 4 LoRA tensors the model has, e.g. base_model.model.")


def test_save_refuses_settings_that_differ_from_the_layers(tmp_path: Path) -> None:
    model = _fresh(r=8, alpha=16)
    with pytest.raises(ValueError, match="has r=8, scaling=2 but the config to save says r=8, scaling=1"):
        save_peft_adapter(model, tmp_path / "x", "tiny", ALL_PROJ, r=8, alpha=8, dropout=0.0, use_rslora=False)
    assert not (tmp_path / "x").exists()


def test_unsupported_options_and_pickles(tmp_path: Path) -> None:
    _, adapter = our_adapter(tmp_path)
    cfg = json.loads((adapter / CONFIG_NAME).read_text())
    (adapter / CONFIG_NAME).write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match=r"unsupported LoRA options \['use_dora'\]"):
        load_peft_adapter(_fresh(), adapter)
    (adapter / CONFIG_NAME).write_text(json.dumps(cfg))
    (adapter / WEIGHTS_NAME).rename(adapter / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"adapter_model\.bin is never unpickled"):
        load_peft_adapter(_fresh(), adapter)


def test_saved_tensors_follow_the_adapter_dtype(tmp_path: Path) -> None:
    model = tiny_llama()
    inject_lora(model, ["v_proj"], r=2, alpha=2, dropout=0.0, adapter_dtype=torch.bfloat16)
    save_peft_adapter(model, tmp_path, "tiny", ["v_proj"], r=2, alpha=2, dropout=0.0, use_rslora=False)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert sorted(tensors) == [
        f"base_model.model.model.layers.{i}.self_attn.v_proj.lora_{ab}.weight" for i in (0, 1) for ab in "AB"
    ]
