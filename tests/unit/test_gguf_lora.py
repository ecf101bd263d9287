"""The adapter alone as a GGUF LoRA file: llama.cpp applying it to the base model's GGUF computes what it computes on
the merged model's GGUF, for a family with permuted Q/K (Llama), one with fused projections (Phi-3) and Gemma 3."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from gguf import GGUFReader
from safetensors.torch import save_file

from qlora_pipeline.kernels.formats.gguf_file import write_gguf
from qlora_pipeline.kernels.formats.gguf_lora import write_gguf_lora
from qlora_pipeline.kernels.formats.peft_adapter import CONFIG_NAME, KEY_PREFIX, WEIGHTS_NAME
from qlora_pipeline.stages.merge import merge_shards
from tests import llama_oracle, tiny

TEXT = "Hello, how are you today? The quick brown fox jumps over the lazy dog."
R, ALPHA = 8, 32.0  # scaling 4, rsLoRA off


def _random_adapter(base: Path, out: Path, targets: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A PEFT adapter on every `targets` linear with a B large enough to move the logits well past the reader gap."""
    from safetensors import safe_open

    gen = torch.Generator().manual_seed(7)
    with safe_open(str(base / "model.safetensors"), framework="pt") as st:
        shapes = {k: st.get_slice(k).get_shape() for k in st.keys()}  # noqa: SIM118 - not a mapping
    pairs, tensors = {}, {}
    for key, (out_f, in_f) in ((k, s) for k, s in shapes.items() if k.rsplit(".", 2)[-2] in targets):
        a = torch.randn(R, in_f, generator=gen) / in_f**0.5
        b = torch.randn(out_f, R, generator=gen) * 0.01
        pairs[key] = (a, b)
        module = key.removesuffix(".weight")
        tensors[f"{KEY_PREFIX}{module}.lora_A.weight"] = a
        tensors[f"{KEY_PREFIX}{module}.lora_B.weight"] = b
    out.mkdir(parents=True)
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": R, "lora_alpha": ALPHA, "target_modules": targets, "bias": "none"}
    (out / CONFIG_NAME).write_text(json.dumps(config))
    return pairs


@pytest.mark.parametrize(
    ("arch", "targets"),
    [
        ("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        ("phi3", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
        ("gemma3", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ],
)
def test_llama_cpp_applies_the_adapter_like_the_merged_model(
    arch: str, targets: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tiny.make_model_dir(tmp_path / "base", arch, hidden_size=256, intermediate_size=512)
    pairs = _random_adapter(base, tmp_path / "adapter", targets)
    merged = tmp_path / "merged"
    merged.mkdir()
    merge_shards(base, merged, pairs, ALPHA / R, torch.float32)
    for f in base.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, merged / f.name)

    stats = write_gguf_lora(tmp_path / "adapter", base, tmp_path / "adapter.gguf", {"general.name": "tiny adapter"})
    assert stats["n_pairs"] == len(pairs) and stats["alpha"] == ALPHA
    fields = {k: f.contents() for k, f in GGUFReader(tmp_path / "adapter.gguf").fields.items()}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == ALPHA and fields["general.architecture"] == stats["arch"]

    write_gguf(base, tmp_path / "base.gguf", "F32")
    write_gguf(merged, tmp_path / "merged.gguf", "F32")
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(base)(TEXT)["input_ids"]

    def logits(model: str, lora: Path | None = None) -> torch.Tensor:
        return torch.from_numpy(llama_oracle.read(tmp_path / model, TEXT, ids, lora=lora)["logits"])

    def rel(x: torch.Tensor, y: torch.Tensor) -> float:
        return float((x - y).norm() / y.norm())

    on_merged = logits("merged.gguf")
    gap = rel(logits("base.gguf", tmp_path / "adapter.gguf"), on_merged)
    effect = rel(logits("base.gguf"), on_merged)
    print(f"{arch}: base + adapter vs merged {gap:.2e}, base alone vs merged {effect:.3f}")
    assert effect > 0.3  # the adapter matters (measured 0.56 llama, 0.66 phi3, 0.84 gemma3) ...
    assert gap < 1e-3  # ... and applying it equals merging it: fp32 rounding only (measured 2e-5 … 2e-4)
    if arch == "llama":  # negative control: B's rows left in HF's order for llama's permuted Q/K
        from qlora_pipeline.kernels.formats import gguf_lora

        monkeypatch.setattr(gguf_lora, "permute_qk", lambda w, _heads: w)
        write_gguf_lora(tmp_path / "adapter", base, tmp_path / "unpermuted.gguf")
        wrong = rel(logits("base.gguf", tmp_path / "unpermuted.gguf"), on_merged)
        print(f"llama without the Q/K permutation: {wrong:.3f}")
        assert wrong > 100 * gap
