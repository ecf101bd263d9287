"""bnb 4-bit serialization: our tensors equal what bnb's Linear4bit/QuantState write; our loader's errors."""

from __future__ import annotations

import json
import re

import pytest
import torch

from qlora_pipeline.kernels.formats.bnb_folder import (
    QUANT_STATE_KEY,
    bnb_quantization_config,
    default_skip,
    load_nf4_state_dict,
    nf4_from_state_dict,
    nf4_to_state_dict,
    quant_state_json,
    quantize_state_dict,
)
from qlora_pipeline.kernels.nf4 import dequantize_nf4, quantize_nf4

bnb = pytest.importorskip("bitsandbytes")

PREFIX = "model.layers.0.mlp.up_proj."


def _bnb_linear_state(w: torch.Tensor, double_quant: bool = True) -> dict[str, torch.Tensor]:
    out_f, in_f = w.shape
    lin = bnb.nn.Linear4bit(in_f, out_f, bias=False, quant_type="nf4", compress_statistics=double_quant)
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=double_quant)
    lin = lin.to("cpu")  # Params4bit quantizes when moved
    return {PREFIX + k: v for k, v in lin.state_dict().items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_equals_bnb(dtype: torch.dtype, double_quant: bool) -> None:
    w = torch.randn(96, 200).to(dtype)
    ref = _bnb_linear_state(w, double_quant)
    ours = nf4_to_state_dict(PREFIX, quantize_nf4(w, double_quant=double_quant))
    assert list(ours) == list(ref)  # same keys, same order
    for key, tensor in ref.items():
        assert ours[key].dtype == tensor.dtype and ours[key].shape == tensor.shape, key
        assert torch.equal(ours[key], tensor), key
    blob = bytes(ours[PREFIX + "weight." + QUANT_STATE_KEY].tolist())
    assert blob.startswith(b'{"quant_type": "nf4", "blocksize": 64, "dtype": ')
    assert (b'"nested_offset": ' in blob) == double_quant


def test_json_blob_matches_quant_state_as_dict() -> None:
    w = torch.randn(4096 // 64, 64 * 3, dtype=torch.bfloat16)
    _, state = bnb.functional.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)
    ref = state.as_dict(packed=True)["quant_state.bitsandbytes__nf4"]
    assert quant_state_json(quantize_nf4(w)).encode() == bytes(ref.tolist())


def test_prefix_forms_and_round_trip() -> None:
    nf4 = quantize_nf4(torch.randn(30, 70, dtype=torch.bfloat16))
    with_dot = nf4_to_state_dict("a.b.", nf4)
    assert with_dot.keys() == nf4_to_state_dict("a.b", nf4).keys()
    assert "weight" in nf4_to_state_dict("", nf4)
    back = nf4_from_state_dict("a.b", with_dot)
    assert back.shape == nf4.shape and back.dtype == nf4.dtype and back.offset == nf4.offset
    assert torch.equal(dequantize_nf4(back), dequantize_nf4(nf4))


def test_loader_reads_bnb_checkpoint_tensors() -> None:
    w = torch.randn(50, 130, dtype=torch.float16)
    back = nf4_from_state_dict(PREFIX, _bnb_linear_state(w))
    assert torch.equal(back.packed, quantize_nf4(w).packed) and back.dtype == torch.float16
    assert back.shape == (50, 130)


def _good() -> dict[str, torch.Tensor]:
    return nf4_to_state_dict(PREFIX, quantize_nf4(torch.randn(64, 80)))


@pytest.mark.parametrize(
    "suffix",
    ["", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", "." + QUANT_STATE_KEY],
)
def test_missing_tensor_is_named(suffix: str) -> None:
    tensors = _good()
    key = PREFIX + "weight" + suffix
    del tensors[key]
    with pytest.raises(ValueError, match=re.escape(f"missing tensor '{key}'")):
        nf4_from_state_dict(PREFIX, tensors)


@pytest.mark.parametrize("suffix", ["", ".absmax", ".nested_absmax", ".nested_quant_map"])
def test_truncated_tensor_is_named(suffix: str) -> None:
    tensors = _good()
    key = PREFIX + "weight" + suffix
    tensors[key] = tensors[key].reshape(-1)[:-1]
    with pytest.raises(ValueError, match=rf"tensor '{key}' has \d+ elements, expected \d+ \(truncated"):
        nf4_from_state_dict(PREFIX, tensors)


def test_bad_quant_state_blobs() -> None:
    key = PREFIX + "weight." + QUANT_STATE_KEY
    tensors = _good()
    tensors[key] = tensors[key][:-5]  # cut JSON
    with pytest.raises(ValueError, match=re.escape(f"quant state '{key}' is not valid UTF-8 JSON")):
        nf4_from_state_dict(PREFIX, tensors)
    tensors = _good()
    state = json.loads(bytes(tensors[key].tolist()))
    del state["shape"], state["nested_offset"]
    tensors[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match="lacks field\\(s\\) shape, nested_offset"):
        nf4_from_state_dict(PREFIX, tensors)
    state = json.loads(bytes(_good()[key].tolist())) | {"quant_type": "fp4"}
    tensors[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match="only 'nf4'"):
        nf4_from_state_dict(PREFIX, tensors)


def test_wrong_dtype_and_quant_map() -> None:
    tensors = _good()
    tensors[PREFIX + "weight.absmax"] = tensors[PREFIX + "weight.absmax"].float()
    with pytest.raises(ValueError, match=re.escape("absmax' has dtype torch.float32, expected torch.uint8")):
        nf4_from_state_dict(PREFIX, tensors)
    tensors = _good()
    tensors[PREFIX + "weight.quant_map"] = tensors[PREFIX + "weight.quant_map"].flip(0)
    with pytest.raises(ValueError, match="not the NF4 table"):
        nf4_from_state_dict(PREFIX, tensors)


def test_quantization_config_equals_transformers() -> None:
    from transformers import BitsAndBytesConfig

    ref = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    ).to_dict()
    ours = bnb_quantization_config("bfloat16")
    assert ours == ref and len(ours) == 13
    assert bnb_quantization_config("float16")["bnb_4bit_compute_dtype"] == "float16"


def test_quantize_state_dict_skips_and_reports() -> None:
    g = torch.Generator().manual_seed(0)
    sd = {
        "model.embed_tokens.weight": torch.randn(100, 64, generator=g).bfloat16(),
        "model.layers.0.input_layernorm.weight": torch.ones(64, dtype=torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64, generator=g).bfloat16(),
        "model.layers.0.self_attn.q_proj.bias": torch.randn(64, generator=g).bfloat16(),
        "model.layers.0.mlp.down_proj.weight": torch.randn(64, 128, generator=g).bfloat16(),
        "lm_head.weight": torch.randn(100, 64, generator=g).bfloat16(),
    }
    new, stats = quantize_state_dict(sd, skip=default_skip)
    assert set(stats) == {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"}
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.bias"):
        assert new[key] is sd[key]
    assert new["model.layers.0.mlp.down_proj.weight"].dtype == torch.uint8
    s = stats["model.layers.0.mlp.down_proj"]
    assert s["bytes_before"] == 64 * 128 * 2
    assert s["bytes_after"] == 64 * 128 // 2 + 128 + 64 + 4 + 1024 + 4
    assert 0.07 < s["rel_error"] < 0.11
    weights, rest = load_nf4_state_dict(new)
    assert set(weights) == set(stats) and set(rest) == set(sd) - {k + ".weight" for k in stats}
    only_q, _ = quantize_state_dict(sd, skip=lambda k: "q_proj" not in k)
    assert only_q["model.layers.0.mlp.down_proj.weight"] is sd["model.layers.0.mlp.down_proj.weight"]


def test_load_nf4_state_dict_rejects_fp4() -> None:
    tensors = _good()
    key = PREFIX + "weight." + QUANT_STATE_KEY
    tensors[key.replace("nf4", "fp4")] = tensors.pop(key)
    with pytest.raises(ValueError, match="is FP4"):
        load_nf4_state_dict(tensors)
