"""Our NF4 folder loads in transformers+bnb exactly like bnb's own on-the-fly quantization, and in our loader.

A tiny random Llama (hidden 256, intermediate 512, 2 layers, 4 heads, 2 kv heads, vocab 512) in bf16.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from qlora_pipeline.kernels.formats.bnb_folder import bnb_quantization_config
from qlora_pipeline.kernels.formats.bnb_loader import load_4bit_model, save_4bit_checkpoint
from qlora_pipeline.kernels.linear4bit import Linear4bit
from qlora_pipeline.kernels.nf4 import quantize_nf4

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, Qwen2Config  # noqa: E402

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(
    scope="module",
    params=[("llama", False), ("llama", True), ("qwen2", True)],
    ids=["llama-untied", "llama-tied", "qwen2-tied"],
)
def folders(request, tmp_path_factory) -> dict:
    arch, tied = request.param
    root = tmp_path_factory.mktemp(f"{arch}-{tied}")
    config_cls = Qwen2Config if arch == "qwen2" else LlamaConfig  # qwen2: q/k/v projections have biases
    config = config_cls(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(root / "bf16")
    (root / "bf16" / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    stats = save_4bit_checkpoint(root / "bf16", root / "nf4")
    ref = AutoModelForCausalLM.from_pretrained(
        root / "bf16",
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        ),
        dtype=torch.bfloat16,
        device_map="cpu",
    )
    # Snapshot before any forward: bnb 0.50.2 on AVX512-BF16 CPUs repacks weights in place on an eval
    # no-grad forward (absmax cast to bf16), after which state_dict() re-quantizes absmax to other bytes.
    ref_state = {k: v.clone() for k, v in ref.state_dict().items()}
    batch = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_logits = ref(batch).logits
    return {
        "root": root,
        "stats": stats,
        "ref_state": ref_state,
        "ref_logits": ref_logits,
        "batch": batch,
        "tied": tied,
        "arch": arch,
    }


def test_folder_layout_and_stats(folders: dict) -> None:
    out = folders["root"] / "nf4"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer_config.json",
    ]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == bnb_quantization_config("bfloat16")
    tensors = load_file(out / "model.safetensors")
    key = "model.layers.1.mlp.down_proj.weight"
    assert tensors[key].dtype == torch.uint8 and tensors[key].shape == (256 * 512 // 2, 1)
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert ("lm_head.weight" in tensors) != folders["tied"]  # untied lm_head stays bf16
    if not folders["tied"]:
        assert tensors["lm_head.weight"].dtype == torch.bfloat16
    stats = folders["stats"]
    assert stats["n_quantized"] == 14 and set(stats["layers"]) == {
        f"model.layers.{i}.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}" for i in range(2) for p in PROJ
    }
    assert 0.08 < stats["mean_rel_error"] < 0.1
    assert 4.1 < stats["bits_per_weight"] < 4.3  # 4 + double-quant state + per-layer 16-entry/256-entry maps
    assert stats["quantized_bytes_after"] < stats["quantized_bytes_before"] / 3.7


def test_transformers_loads_our_folder_identically_to_bnb(folders: dict) -> None:
    ours = AutoModelForCausalLM.from_pretrained(folders["root"] / "nf4")
    assert isinstance(ours.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    sd_ours, sd_ref = ours.state_dict(), folders["ref_state"]
    assert sd_ours.keys() == sd_ref.keys()
    packed = [k for k in sd_ref if k.endswith("proj.weight")]
    assert len(packed) == 14
    for key, tensor in sd_ref.items():
        assert sd_ours[key].dtype == tensor.dtype and torch.equal(sd_ours[key], tensor), key
    with torch.no_grad():
        logits = ours(folders["batch"]).logits
    assert torch.equal(logits, folders["ref_logits"])


def test_our_loader_matches_bnb_logits(folders: dict) -> None:
    model = load_4bit_model(folders["root"] / "nf4", compute_dtype=torch.bfloat16)
    assert isinstance(model.model.layers[1].mlp.gate_proj, Linear4bit)
    assert not isinstance(model.lm_head, Linear4bit)
    assert all(not p.requires_grad for p in model.parameters()) and not model.training
    if folders["tied"]:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    q_proj = model.model.layers[0].self_attn.q_proj
    assert (q_proj.bias is not None) == (folders["arch"] == "qwen2")
    if q_proj.bias is not None:
        bias = load_file(folders["root"] / "nf4" / "model.safetensors")["model.layers.0.self_attn.q_proj.bias"]
        assert torch.equal(q_proj.bias, bias) and not q_proj.bias.is_meta
    with torch.no_grad():
        logits = model(folders["batch"]).logits
    ref = folders["ref_logits"]
    assert logits.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.float().abs().max().item())
    # the saved state of our model is the folder's bytes again
    for key, tensor in load_file(folders["root"] / "nf4" / "model.safetensors").items():
        assert torch.equal(model.state_dict()[key], tensor), key


def test_loader_errors(folders: dict, tmp_path: Path) -> None:
    src = folders["root"] / "nf4"
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    tensors = load_file(src / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(ValueError, match=r"tensor 'model\.norm\.weight' missing"):
        load_4bit_model(broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no model\.safetensors"):
        load_4bit_model(broken)
    with pytest.raises(ValueError, match="already quantized"):
        save_4bit_checkpoint(src, tmp_path / "again")


def test_weight_dtype_casts_before_quantizing(folders: dict, tmp_path: Path) -> None:
    # runs for every configuration: the cast must happen before quantizing whatever the architecture
    save_4bit_checkpoint(folders["root"] / "bf16", tmp_path / "fp16", weight_dtype=torch.float16)
    tensors = load_file(tmp_path / "fp16" / "model.safetensors")
    src = load_file(folders["root"] / "bf16" / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    key = "model.layers.0.mlp.up_proj.weight"
    blob = bytes(tensors[key + ".quant_state.bitsandbytes__nf4"].tolist())
    assert b'"dtype": "float16"' in blob
    assert torch.equal(tensors[key], quantize_nf4(src.half()).packed)
    assert tensors["model.norm.weight"].dtype == torch.float16


def test_sharded_source_is_quantized_into_bounded_shards_transformers_loads(folders: dict, tmp_path: Path) -> None:
    """A source saved as several shards is quantized one tensor at a time into output shards no larger than the
    largest input shard, with an index; the tensors equal those of the single-file run and transformers+bnb loads
    the sharded folder to the same logits."""
    src = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(folders["root"] / "bf16", dtype=torch.bfloat16).save_pretrained(
        src, max_shard_size="300KB"
    )
    inputs = sorted(src.glob("*.safetensors"))
    assert len(inputs) > 2
    save_4bit_checkpoint(src, tmp_path / "nf4")
    index = json.loads((tmp_path / "nf4" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    largest_input = max(f.stat().st_size for f in inputs)
    tensors: dict[str, torch.Tensor] = {}
    for name in shards:
        part = load_file(tmp_path / "nf4" / name)
        assert sum(t.numel() * t.element_size() for t in part.values()) <= largest_input or len(part) == 1
        tensors.update(part)
    single = load_file(folders["root"] / "nf4" / "model.safetensors")
    assert tensors.keys() == single.keys() and all(torch.equal(tensors[k], single[k]) for k in single)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "nf4")
    with torch.no_grad():
        assert torch.equal(ours(folders["batch"]).logits, folders["ref_logits"])
