"""GGUF export: keys, names, shapes and types read back with gguf.GGUFReader; transformers and llama.cpp as loaders.

The tiny models use hidden 256 / FFN 512 so Q4_K_M really produces Q4_K and Q6_K tensors (K-quants need rows that are
a multiple of 256). The F16 round trip through transformers is the permutation oracle: transformers un-permutes Q/K
for llama and leaves qwen2 alone, so matching logits prove we permuted exactly where llama.cpp expects it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader
from gguf.quants import dequantize

from qlora_pipeline.kernels import kquants
from qlora_pipeline.kernels.formats import gguf_file as gguf_export
from qlora_pipeline.kernels.formats.gguf_file import permute_qk, write_gguf
from tests import llama_oracle, tiny

DIMS = {"hidden_size": 256, "intermediate_size": 512}
LINEAGE = {
    "general.source.repo_url": "https://example.org/qlora-pipeline",
    "general.uuid": "0b5a6d4e-2d2c-4c61-9d1f-3a9f9f0c1e77",
    "qlora.dataset_sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "qlora.git_commit": "4c2f1d0",
}
LLAMA31_ROPE = tiny.LLAMA31_ROPE
TEXT = "Hello, how are you today? The quick brown fox jumps over the lazy dog."
QTYPES = ("F16", "Q8_0", "Q4_0", "Q4_K_M", "Q5_K_M")
FAMILIES = ("llama", "qwen2", "mistral", "qwen3", "llama-spm", "phi3", "gemma2", "gemma3")
NO_SECOND_READER = {"gemma2", "gemma3"}
"""transformers' GGUF loader is no second reader for these: it rebuilds Gemma 2 without the query scale our file's
model uses (measured 0.061 off the source while llama.cpp is 0.0007 off) and Gemma 3 without its sliding layers and
their rope base (0.596 off, llama.cpp 0.0008), so llama.cpp is compared with the source."""


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.make_model_dir(tmp_path_factory.mktemp("gguf") / "llama", "llama", **DIMS)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.make_model_dir(tmp_path_factory.mktemp("gguf") / "qwen2", "qwen2", **DIMS)


@pytest.fixture(scope="module")
def family_dirs(llama_dir: Path, qwen2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny model per family the writer takes (Mistral with a sliding window, as v0.1 ships it)."""
    root = tmp_path_factory.mktemp("families")
    return {
        "llama": llama_dir,
        "qwen2": qwen2_dir,
        # not named "mistral…": transformers' GGUF loader maps any general.name containing it to a model type gguf
        # 0.19 lacks; llama.cpp reads the file either way
        "mistral": tiny.make_model_dir(root / "m7", "mistral", sliding_window=4096, **DIMS),
        # head_dim 128 as every Qwen3 ships (q wider than hidden); transformers' GGUF loader assumes 128 for qwen3
        "qwen3": tiny.make_model_dir(root / "qwen3", "qwen3", head_dim=128, **DIMS),
        # Llama 2 / Mistral v0.1–0.3 / TinyLlama tokenizer kind: SentencePiece-style BPE with byte fallback
        "llama-spm": tiny.make_model_dir(root / "spm", "llama", tokenizer="sentencepiece", **DIMS),
        # fused qkv_proj and gate_up_proj; not named "phi3…": llama.cpp then expects Phi-3's own special tokens
        "phi3": tiny.make_model_dir(root / "p3", "phi3", **DIMS),
        # (1 + w) norms, scaled embeddings, soft-capping, sliding window (8 < the text) on alternate layers
        "gemma2": tiny.make_model_dir(root / "g2", "gemma2", **DIMS),
        # + q/k norms, a sliding layer (window 8 < the test text, rope base 10k) then a global one (rope base 1M)
        "gemma3": tiny.make_model_dir(root / "g3", "gemma3", **DIMS),
    }


@pytest.fixture(scope="module")
def llama31_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama 3.1's features: `llama3` rope scaling (context 64 so it moves most frequencies of a tiny model) and an
    untied output head."""
    return tiny.make_model_dir(
        tmp_path_factory.mktemp("gguf") / "llama31",
        "llama",
        rope_parameters=LLAMA31_ROPE,
        tie_word_embeddings=False,
        **DIMS,
    )


@pytest.fixture(scope="module")
def small_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """hidden 64, FFN 128: no row fits a 256 super-block, so every K-quant falls back."""
    return tiny.make_model_dir(tmp_path_factory.mktemp("gguf") / "small", "llama")


@pytest.fixture(scope="module")
def llama_exports(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    out = tmp_path_factory.mktemp("exports")
    return {q: (out / f"m.{q}.gguf", write_gguf(llama_dir, out / f"m.{q}.gguf", q, LINEAGE)) for q in QTYPES}


def _fields(path: Path) -> dict[str, Any]:
    r = GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def _tensors(path: Path) -> dict[str, Any]:
    return {t.name: t for t in GGUFReader(path).tensors}


def _hf_model(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _source_weights(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    return {k: v.float().numpy() for k, v in load_file(str(model_dir / "model.safetensors")).items()}


def _gguf_logits(gguf_path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(ids).logits[0]


def _ids(model_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    return torch.tensor([AutoTokenizer.from_pretrained(model_dir)(TEXT)["input_ids"]])


# ---------------------------------------------------------------------------------------------------- metadata


def test_llama_keys_tokenizer_and_lineage(llama_dir: Path, llama_exports: dict) -> None:
    from transformers import AutoTokenizer

    path, stats = llama_exports["F16"]
    f = _fields(path)
    cfg = json.loads((llama_dir / "config.json").read_text())
    assert f["general.architecture"] == "llama"
    assert f["general.file_type"] == 1 and f["general.quantization_version"] == 2
    expect = {
        "llama.block_count": 2,
        "llama.context_length": 512,
        "llama.embedding_length": 256,
        "llama.feed_forward_length": 512,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 64,
        "llama.vocab_size": cfg["vocab_size"],
    }
    assert {k: f[k] for k in expect} == expect
    assert f["llama.rope.freq_base"] == pytest.approx(cfg["rope_parameters"]["rope_theta"])
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])

    tok = AutoTokenizer.from_pretrained(llama_dir)
    vocab = tok.get_vocab()
    tokens = f["tokenizer.ggml.tokens"]
    assert len(tokens) == len(vocab) == len(set(tokens))  # unique: llama.cpp aborts on duplicates
    assert all(tokens[i] == t for t, i in vocab.items())
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2" == stats["tokenizer_pre"]
    assert f["tokenizer.ggml.token_type"][:3] == [3, 3, 3] and set(f["tokenizer.ggml.token_type"][3:]) == {1}
    merges = json.loads((llama_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert f["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (1, 2)  # <|im_start|>, <|im_end|>
    assert (f["tokenizer.ggml.unknown_token_id"], f["tokenizer.ggml.padding_token_id"]) == (0, 0)
    assert f["tokenizer.ggml.add_bos_token"] is False and f["tokenizer.ggml.add_eos_token"] is False
    assert f["tokenizer.chat_template"] == tiny.CHATML
    for k, v in LINEAGE.items():
        assert f[k] == v
    assert {q: _fields(p)["general.file_type"] for q, (p, _) in llama_exports.items()} == {
        "F16": 1,
        "Q8_0": 7,
        "Q4_0": 2,
        "Q4_K_M": 15,
        "Q5_K_M": 17,
    }


def test_names_shapes_and_types_per_qtype(llama_exports: dict) -> None:
    block = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    names = {"token_embd.weight", "output_norm.weight"} | {f"blk.{i}.{b}.weight" for i in range(2) for b in block}
    for q, (path, stats) in llama_exports.items():
        ts = _tensors(path)
        assert set(ts) == names, q  # tied embeddings: no output.weight
        shape = {n: [int(d) for d in t.shape] for n, t in ts.items()}  # GGUF ne order: (cols, rows)
        assert shape["token_embd.weight"] == [256, 384]
        assert shape["blk.0.attn_q.weight"] == [256, 256] and shape["blk.0.attn_k.weight"] == [256, 128]
        assert shape["blk.1.ffn_down.weight"] == [512, 256] and shape["blk.1.ffn_up.weight"] == [256, 512]
        assert shape["output_norm.weight"] == [256]
        types = {n: t.tensor_type for n, t in ts.items()}
        assert all(types[n] == QT.F32 for n in names if "norm" in n)
        mats = {n: t for n, t in types.items() if "norm" not in n}
        if q in ("F16", "Q8_0"):
            assert set(mats.values()) == {QT[q]}
        elif q == "Q4_0":  # llama-quantize lifts the (tied) output head to Q6_K
            assert mats.pop("token_embd.weight") == QT.Q6_K and set(mats.values()) == {QT.Q4_0}
        else:  # Q4_K_M / Q5_K_M with 2 layers: use_more_bits(i, 2) is true for layer 1 only
            six = {"token_embd.weight", "blk.1.attn_v.weight", "blk.1.ffn_down.weight"}
            assert {n for n, t in mats.items() if t == QT.Q6_K} == six
            base = QT.Q4_K if q == "Q4_K_M" else QT.Q5_K
            assert all(t == base for n, t in mats.items() if n not in six)
        counts: dict[str, int] = {}
        for t in types.values():
            counts[t.name] = counts.get(t.name, 0) + 1
        assert stats["tensor_types"] == dict(sorted(counts.items()))
        assert stats["fallbacks"] == [] and stats["file_size"] == path.stat().st_size and stats["n_tensors"] == 20
    sizes = {q: s["file_size"] for q, (_, s) in llama_exports.items()}
    assert sizes["F16"] > sizes["Q8_0"] > sizes["Q5_K_M"] > sizes["Q4_K_M"] > sizes["Q4_0"]


def test_untied_model_writes_output_weight(tmp_path: Path) -> None:
    d = tiny.make_model_dir(tmp_path / "untied", "llama", seed=1, tie_word_embeddings=False, **DIMS)
    stats = write_gguf(d, tmp_path / "o" / "m.Q4_K_M.gguf", "Q4_K_M")
    ts = _tensors(tmp_path / "o" / "m.Q4_K_M.gguf")
    assert ts["output.weight"].tensor_type == QT.Q6_K  # LM head
    assert ts["token_embd.weight"].tensor_type == QT.Q4_K  # untied embedding is an ordinary Q4_K tensor
    assert stats["tied_embeddings"] is False and stats["n_tensors"] == 21
    write_gguf(d, tmp_path / "o" / "m.F16.gguf", "F16")
    ids = _ids(d)
    with torch.no_grad():
        ref = _hf_model(d)(ids).logits[0]
    got = _gguf_logits(tmp_path / "o" / "m.F16.gguf", ids)
    assert (got - ref).abs().max().item() < 1e-4


# ---------------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_f16_round_trip_through_transformers(arch: str, llama_dir: Path, qwen2_dir: Path, tmp_path: Path) -> None:
    d = llama_dir if arch == "llama" else qwen2_dir
    out = tmp_path / "m.F16.gguf"
    stats = write_gguf(d, out, "F16")
    if arch == "qwen2":
        ts = _tensors(out)
        assert all(ts[f"blk.0.attn_{x}.bias"].tensor_type == QT.F32 for x in "qkv")
        assert stats["n_tensors"] == 26 and _fields(out)["general.architecture"] == "qwen2"
    ids = _ids(d)
    with torch.no_grad():
        ref = _hf_model(d)(ids).logits[0]
    got = _gguf_logits(out, ids)
    # bf16 weights are exact in fp16 at these magnitudes, so only float32 summation order differs (measured ~6e-7).
    assert (got - ref).abs().max().item() < 1e-4


def test_llama_round_trip_detects_a_missing_permutation(
    llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Negative control: without the Q/K permutation the same comparison fails by a wide margin."""
    monkeypatch.setattr(gguf_export, "permute_qk", lambda w, n_head: w)
    out = tmp_path / "m.F16.gguf"
    write_gguf(llama_dir, out, "F16")
    ids = _ids(llama_dir)
    with torch.no_grad():
        ref = _hf_model(llama_dir)(ids).logits[0]
    assert (_gguf_logits(out, ids) - ref).abs().max().item() > 0.05


def test_permute_qk_interleaves_head_halves() -> None:
    w = np.arange(8)[:, None] * np.ones((1, 3))  # one head of 8 rows: HF pairs (i, i+4), llama.cpp (2i, 2i+1)
    assert permute_qk(w, 1)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    b = np.arange(8.0)
    assert permute_qk(b, 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_quantized_tensors_and_logits_close_to_source(llama_dir: Path, llama_exports: dict) -> None:
    src = _source_weights(llama_dir)
    hf_of = {"token_embd.weight": "model.embed_tokens.weight"}
    sub = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj"}
    sub |= {"attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj"}
    sub |= {"ffn_down": "mlp.down_proj"}
    for i in range(2):
        for g, h in sub.items():
            hf_of[f"blk.{i}.{g}.weight"] = f"model.layers.{i}.{h}.weight"
    heads = {"attn_q": 4, "attn_k": 2}
    ids = _ids(llama_dir)
    with torch.no_grad():
        ref_logits = _hf_model(llama_dir)(ids).logits[0]

    per_type: dict[str, list[float]] = {}
    logit_err: dict[str, float] = {}
    for q in ("Q8_0", "Q4_0", "Q4_K_M"):
        path, _ = llama_exports[q]
        for name, t in _tensors(path).items():
            if name not in hf_of:
                continue
            x = src[hf_of[name]]
            kind = name.split(".")[-2]
            if kind in heads:
                x = permute_qk(x, heads[kind])
            y = dequantize(np.array(t.data), t.tensor_type)
            per_type.setdefault(t.tensor_type.name, []).append(float(np.linalg.norm(y - x) / np.linalg.norm(x)))
        got = _gguf_logits(path, ids)
        logit_err[q] = float((got - ref_logits).norm() / ref_logits.norm())
    rel = {k: max(v) for k, v in per_type.items()}
    print("max relative weight error per type:", rel, "relative logits error per file:", logit_err)
    # Measured on N(0, 0.02) weights: Q8_0 ~0.005, Q6_K ~0.018, Q4_K ~0.07, Q4_0 ~0.086.
    assert rel["Q8_0"] < 0.008 and rel["Q6_K"] < 0.025 and rel["Q4_K"] < 0.08 and rel["Q4_0"] < 0.1
    assert logit_err["Q8_0"] < 0.03 and logit_err["Q8_0"] < logit_err["Q4_K_M"] < logit_err["Q4_0"] < 0.3


def test_small_hidden_falls_back_like_llama_cpp(small_llama_dir: Path, tmp_path: Path) -> None:
    stats = write_gguf(small_llama_dir, tmp_path / "m.gguf", "Q4_K_M")
    types = {n: t.tensor_type for n, t in _tensors(tmp_path / "m.gguf").items()}
    assert types["token_embd.weight"] == QT.Q8_0  # output rule: Q6_K needs 256 columns
    assert types["blk.0.attn_q.weight"] == QT.Q5_0 and types["blk.1.attn_v.weight"] == QT.Q8_0
    assert types["blk.0.ffn_down.weight"] == QT.Q5_0 and types["blk.1.ffn_down.weight"] == QT.Q8_0
    used = {(f["tensor"], f["wanted"], f["used"]) for f in stats["fallbacks"]}
    assert ("blk.0.attn_q.weight", "Q4_K", "Q5_0") in used and ("token_embd.weight", "Q6_K", "Q8_0") in used
    assert len(stats["fallbacks"]) == 15  # every 2-D tensor: 7 per layer x 2 + token_embd
    assert stats["tensor_types"] == {"F32": 5, "Q5_0": 12, "Q8_0": 3}


# ---------------------------------------------------------------------------------------------------- errors


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_unsupported_architecture(llama_dir: Path, tmp_path: Path) -> None:
    d = _copy(llama_dir, tmp_path / "gpt2")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    msg = "unsupported architecture GPT2LMHeadModel for GGUF export; supported: LlamaForCausalLM, Qwen2ForCausalLM, "
    with pytest.raises(ValueError, match=msg):
        write_gguf(d, tmp_path / "x.gguf", "F16")
    assert not (tmp_path / "x.gguf").exists()


def test_missing_tensor_is_named(llama_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    d = _copy(llama_dir, tmp_path / "broken")
    sd = load_file(str(d / "model.safetensors"))
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensor model\.layers\.1\.mlp\.down_proj\.weight") as e:
        write_gguf(d, tmp_path / "x.gguf", "Q8_0")
    assert "\n" not in str(e.value)
    assert list(tmp_path.glob("*.gguf*")) == [] and list(tmp_path.glob(".*tmp")) == []


def test_error_mid_write_leaves_no_partial_file(
    llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous export")

    def boom(x: np.ndarray) -> np.ndarray:
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(kquants, "quantize_q6_k", boom)  # first hit after several tensors were streamed
    with pytest.raises(RuntimeError, match="simulated"):
        write_gguf(llama_dir, out, "Q4_K_M")
    assert out.read_bytes() == b"previous export"  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # and no temp file is left


def test_bad_qtype_and_reserved_metadata(llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown GGUF qtype 'Q3_K'"):
        write_gguf(llama_dir, tmp_path / "x.gguf", "Q3_K")
    with pytest.raises(ValueError, match="reserved"):
        write_gguf(llama_dir, tmp_path / "x.gguf", "F16", {"llama.block_count": "3"})
    assert list(tmp_path.iterdir()) == []


def test_duplicate_token_strings_refused(llama_dir: Path, tmp_path: Path) -> None:
    d = _copy(llama_dir, tmp_path / "dupe")
    tj = json.loads((d / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    victim = next(t for t, i in vocab.items() if i == 10)
    del vocab[victim]
    vocab["<|im_start|>"] = 10  # id 1 keeps "<|im_start|>" through added_tokens: two ids, one string
    (d / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ValueError, match="duplicate token strings"):
        write_gguf(d, tmp_path / "x.gguf", "F16")
    assert not (tmp_path / "x.gguf").exists()


def test_pre_tokenizer_detection(llama_dir: Path, qwen2_dir: Path, tmp_path: Path) -> None:
    d = _copy(llama_dir, tmp_path / "smol")
    cfg = json.loads((d / "config.json").read_text())
    cfg["_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    (d / "config.json").write_text(json.dumps(cfg))
    assert write_gguf(d, tmp_path / "a.gguf", "F16")["tokenizer_pre"] == "smollm"
    assert _fields(tmp_path / "a.gguf")["tokenizer.ggml.pre"] == "smollm"
    over = write_gguf(llama_dir, tmp_path / "b.gguf", "F16", {"tokenizer.ggml.pre": "llama-bpe"})
    assert over["tokenizer_pre"] == "llama-bpe"
    # A Qwen2 tokenizer (Split regex with single digits, then byte-level) is "qwen2"; our tiny qwen2 model has a plain
    # GPT-2 byte-level tokenizer, whose correct llama.cpp name is "gpt-2".
    q = _copy(qwen2_dir, tmp_path / "qwen_tok")
    tj = json.loads((q / "tokenizer.json").read_text())
    qwen_regex = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tj["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": qwen_regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        ],
    }
    (q / "tokenizer.json").write_text(json.dumps(tj))
    assert write_gguf(q, tmp_path / "c.gguf", "F16")["tokenizer_pre"] == "qwen2"
    assert write_gguf(qwen2_dir, tmp_path / "d.gguf", "F16")["tokenizer_pre"] == "gpt-2"


# ---------------------------------------------------------------------------------------------------- llama.cpp


QUANT_COST, READER_GAP = llama_oracle.QUANT_COST, llama_oracle.READER_GAP


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(("arch", "qtype"), [(a, q) for a in FAMILIES for q in QTYPES])
def test_llama_cpp_loads_tokenizes_and_matches_logits(
    arch: str, qtype: str, family_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """Two readers of one file agree (llama.cpp in a child process, transformers' GGUF loader, which undoes the
    Q/K permutation itself); F16 is lossless, so there transformers' load must equal the 16-bit source."""
    from transformers import AutoModelForCausalLM

    d = family_dirs[arch]
    out = tmp_path / f"m.{qtype}.gguf"
    write_gguf(d, out, qtype)
    ids = _ids(d)
    read = llama_oracle.read(out, TEXT, ids[0].tolist())
    assert read["tokens"] == ids[0].tolist()
    # llama-cpp-python detokenizes piece by piece, so the space SentencePiece puts before the text stays
    assert read["detok"] == (" " + TEXT if arch == "llama-spm" else TEXT)
    got = torch.from_numpy(read["logits"])
    with torch.no_grad():
        ref = _hf_model(d)(ids).logits[0]
    top1 = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    if arch in NO_SECOND_READER:
        gap = _rel(got, ref)
        print(f"{arch} {qtype}: llama.cpp vs transformers on the source {gap:.4f}, top-1 {top1:.2f}")
        assert gap < READER_GAP[qtype] + QUANT_COST[qtype]
    else:
        with torch.no_grad():
            from_gguf = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32)
            hf_gguf = from_gguf.eval()(ids).logits[0]
        reader_gap, cost = _rel(got, hf_gguf), _rel(hf_gguf, ref)
        print(f"{arch} {qtype}: llama.cpp vs transformers {reader_gap:.4f}, weights vs 16-bit {cost:.4f}")
        assert reader_gap < READER_GAP[qtype]
        assert cost < QUANT_COST[qtype]
    # Q8_0 moves Gemma 2's near-tied random logits enough to flip one of 33 argmaxes (0.97)
    if qtype == "F16" or (qtype == "Q8_0" and arch not in NO_SECOND_READER):
        assert top1 == 1.0
    assert read["n_tokens"] > 1 and isinstance(read["generated"], str)


@pytest.mark.parametrize("model", ["hidden256", "hidden64", "phi3"])
def test_llama_cpp_quantizer_agrees_with_ours(
    model: str, llama_dir: Path, small_llama_dir: Path, family_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """Whole-file check against llama_model_quantize fed with the same weights (an F32 GGUF of the bf16 model, so
    both sides quantize identical floats): same type for every tensor and byte-identical tensor data. hidden256
    exercises Q4_K/Q5_K/Q6_K, hidden64 the Q5_0/Q5_1/Q8_0 shape fallbacks, Phi-3 the rule for its fused attn_qkv."""
    src = {"hidden256": llama_dir, "hidden64": small_llama_dir, "phi3": family_dirs["phi3"]}[model]
    f32_dir = tmp_path / "f32"
    _hf_model(src).save_pretrained(f32_dir, safe_serialization=True)  # bf16 -> float32 is exact
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / f).is_file():
            shutil.copy(src / f, f32_dir / f)
    f32 = tmp_path / "m.F32.gguf"
    write_gguf(f32_dir, f32, "F32")
    for qtype in ("Q4_K_M", "Q5_K_M", "Q4_0", "Q8_0"):
        ref_path, ours_path = tmp_path / f"ref.{qtype}.gguf", tmp_path / f"ours.{qtype}.gguf"
        llama_oracle.quantize(f32, ref_path, qtype)
        write_gguf(src, ours_path, qtype)
        ref, ours = _tensors(ref_path), _tensors(ours_path)
        assert set(ref) == set(ours)
        assert {n: t.tensor_type for n, t in ours.items()} == {n: t.tensor_type for n, t in ref.items()}
        same = {n: bool(np.array_equal(np.array(ours[n].data), np.array(ref[n].data))) for n in ref}
        print(qtype, "byte-identical tensors:", sum(same.values()), "/", len(same))
        assert all(same.values()), [n for n, ok in same.items() if not ok]
        assert _fields(ours_path)["general.file_type"] == _fields(ref_path)["general.file_type"]


@pytest.mark.parametrize("qtype", QTYPES)
def test_llama31_rope_scaling_reaches_llama_cpp(qtype: str, llama31_dir: Path, tmp_path: Path) -> None:
    """`llama3` rope scaling travels as the `rope_freqs.weight` tensor; llama.cpp's logits then match transformers'
    on the 16-bit source within the reader gap plus the type's cost."""
    out = tmp_path / f"m.{qtype}.gguf"
    write_gguf(llama31_dir, out, qtype)
    tensors = _tensors(out)
    assert "output.weight" in tensors
    factors = np.array(tensors["rope_freqs.weight"].data)
    assert factors.shape == (DIMS["hidden_size"] // 4 // 2,) and factors[0] == 1.0 and factors[-1] == 8.0
    ids = _ids(llama31_dir)
    read = llama_oracle.read(out, TEXT, ids[0].tolist())
    with torch.no_grad():
        ref = _hf_model(llama31_dir)(ids).logits[0]
    gap = _rel(torch.from_numpy(read["logits"]), ref)
    print(f"llama3 rope {qtype}: llama.cpp vs transformers on the source {gap:.4f}")
    assert gap < READER_GAP[qtype] + QUANT_COST[qtype]


def test_llama31_without_its_rope_factors_is_caught(
    llama31_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Negative control: the same model written with every factor 1 (plain rope) is many times further from
    transformers' logits than the file with the factors (measured 2026-12-04: 0.0199 against 0.0005)."""
    from qlora_pipeline.kernels.formats import gguf_tensors

    ids = _ids(llama31_dir)
    with torch.no_grad():
        ref = _hf_model(llama31_dir)(ids).logits[0]

    def gap(path: Path) -> float:
        return _rel(torch.from_numpy(llama_oracle.read(path, TEXT, ids[0].tolist())["logits"]), ref)

    write_gguf(llama31_dir, tmp_path / "right.gguf", "F16")
    monkeypatch.setattr(gguf_tensors, "llama3_rope_factors", lambda rope, theta, head_dim: (1.0,) * (head_dim // 2))
    write_gguf(llama31_dir, tmp_path / "plain.gguf", "F16")
    right, plain = gap(tmp_path / "right.gguf"), gap(tmp_path / "plain.gguf")
    print(f"llama3 rope F16: with factors {right:.4f}, plain rope {plain:.4f}")
    assert right < READER_GAP["F16"] and plain > 10 * right


@pytest.mark.parametrize(
    "text",
    ["Ünïcödé 😀 and  two  spaces", "def add(a, b): return a + b\n\treturn", "What is the capital of France?"],
)
def test_llama_cpp_tokenizes_like_transformers_with_a_sentencepiece_vocab(
    text: str, family_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """Byte fallback, emoji, runs of spaces, tabs and newlines: llama.cpp's SentencePiece tokenizer over our scores
    gives transformers' ids."""
    from transformers import AutoTokenizer

    d = family_dirs["llama-spm"]
    out = tmp_path / "m.F16.gguf"
    write_gguf(d, out, "F16")
    ids = AutoTokenizer.from_pretrained(d)(text)["input_ids"]
    assert llama_oracle.read(out, text, ids)["tokens"] == ids


def test_gemma3_sliding_layers_and_their_rope_base_reach_llama_cpp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gemma 3's per-layer attention: which layers slide (from `layer_types`, not llama.cpp's default 5:1 pattern)
    and their own rope base (here 50k, not llama.cpp's default 10k) are in the file, and llama.cpp's logits match the
    source only with them: each dropped in turn moves its logits far past the reader gap."""
    from gguf import GGUFWriter

    rope = {
        "sliding_attention": {"rope_type": "default", "rope_theta": 50000.0},
        "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
    }
    d = tiny.make_model_dir(tmp_path / "g3", "gemma3", rope_parameters=rope, **DIMS)
    ids = _ids(d)
    with torch.no_grad():
        ref = _hf_model(d)(ids).logits[0]

    def gap(name: str) -> float:
        out = tmp_path / f"{name}.gguf"
        write_gguf(d, out, "F16")
        measured = _rel(torch.from_numpy(llama_oracle.read(out, TEXT, ids[0].tolist())["logits"]), ref)
        print(f"gemma3 {name}: llama.cpp vs the source {measured:.4f}")
        return measured

    assert gap("full") < READER_GAP["F16"]
    fields = _fields(tmp_path / "full.gguf")
    assert fields["gemma3.attention.sliding_window"] == 8
    assert fields["gemma3.attention.sliding_window_pattern"] == [True, False]
    assert fields["gemma3.rope.freq_base_swa"] == 50000.0 and fields["gemma3.rope.freq_base"] == 1000000.0
    with monkeypatch.context() as m:
        m.setattr(GGUFWriter, "add_sliding_window_pattern", lambda *_a: None)
        assert gap("no-pattern") > 0.1  # llama.cpp's default pattern makes the global layer slide too
    with monkeypatch.context() as m:
        m.setattr(GGUFWriter, "add_rope_freq_base_swa", lambda *_a: None)
        assert gap("no-local-base") > 0.02  # the sliding layer rotates with 10k instead of 50k
