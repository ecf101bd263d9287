"""Our Q4_K / Q6_K quantizers against the ggml block layout, the gguf decoder and (when built) llama.cpp itself.

Three independent checks:
* exact-grid inputs (values a K-quant can store exactly) must decode exactly, and the bytes must sit where
  ggml-common.h says (scale packing, nibble order, the Q6_K ql/qh split);
* random weights must decode (with `gguf.quants.dequantize`, a separate implementation) to the error the format
  allows, ordered Q8_0 < Q6_K < Q4_K < Q4_0;
* with llama-cpp-python importable, `llama_model_quantize` (the C reference quantizers) must produce the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader
from gguf.quants import dequantize, quantize

from qlora_pipeline.kernels.kquant_mix import Fallback, k_m_type_for, use_more_bits
from qlora_pipeline.kernels.kquants import quantize_q4_k, quantize_q5_k, quantize_q6_k
from tests import llama_oracle


def _rel_rmse(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sqrt(np.mean((y.astype(np.float64) - x) ** 2)) / np.std(x))


def _heavy_tailed(rows: int, cols: int, seed: int) -> np.ndarray:
    """Weight-like data with the awkward cases: Student-t tails, an all-zero super-block, a constant negative run,
    a sub-block of positives only (min clamps to 0) and one huge outlier."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_t(5, size=(rows, cols)) * 0.02).astype(np.float32)
    x[0, :256] = 0.0
    x[1, 32:64] = -0.01
    x[2, 64:96] = np.abs(x[2, 64:96]) + 0.001
    x[3, 7] = 0.9
    return x


# ---------------------------------------------------------------------------------------------------- layout


def test_q4_k_exact_grid_and_byte_layout() -> None:
    # Values L * 63/64 with L in 0..15 (both ends present in every 32-value sub-block) are exactly representable:
    # sub-scale 63 (6 bits) times d = 1/64 (exact in fp16), min 0.
    rng = np.random.default_rng(1)
    L = rng.integers(0, 16, size=(3, 512)).astype(np.float32)
    L[:, ::32], L[:, 1::32] = 0, 15
    x = L * np.float32(63 / 64)
    q = quantize_q4_k(x)
    assert q.shape == (3, 2 * 144) and q.dtype == np.uint8
    np.testing.assert_array_equal(dequantize(q, QT.Q4_K), x)

    blk = q[0, :144]
    assert np.frombuffer(blk[0:2].tobytes(), np.float16)[0] == np.float16(1 / 64)  # d
    assert np.frombuffer(blk[2:4].tobytes(), np.float16)[0] == 0  # dmin
    # 12 scale bytes: sc 0-3 in the low 6 bits of bytes 0-3 (their top 2 bits carry sc 4-7's high bits),
    # min 0-3 in bytes 4-7, and the low nibbles of sc/min 4-7 in bytes 8-11.
    assert blk[4:16].tolist() == [255] * 4 + [0] * 4 + [15] * 4
    qs = blk[16:]
    for e in range(256):  # value 64c + 32h + l sits in byte 32c + l, nibble h
        c, h, lane = e // 64, (e % 64) // 32, e % 32
        assert (qs[32 * c + lane] >> (4 * h)) & 0xF == L[0, e]


def test_q5_k_exact_grid_and_byte_layout() -> None:
    # Values L * 63/64 with L in 0..31 (both ends in every 32-value sub-block): sub-scale 63, d = 1/64, min 0.
    rng = np.random.default_rng(3)
    L = rng.integers(0, 32, size=(3, 512)).astype(np.float32)
    L[:, ::32], L[:, 1::32] = 0, 31
    x = L * np.float32(63 / 64)
    q = quantize_q5_k(x)
    assert q.shape == (3, 2 * 176) and q.dtype == np.uint8
    np.testing.assert_array_equal(dequantize(q, QT.Q5_K), x)

    blk = q[0, :176]
    assert np.frombuffer(blk[0:2].tobytes(), np.float16)[0] == np.float16(1 / 64)  # d
    assert blk[4:16].tolist() == [255] * 4 + [0] * 4 + [15] * 4  # scales packed as Q4_K's
    qh, qs = blk[16:48], blk[48:]
    for e in range(256):  # value 64c + 32h + l: low nibble h of qs[32c + l], fifth bit at bit 2c + h of qh[l]
        c, h, lane = e // 64, (e % 64) // 32, e % 32
        low = (qs[32 * c + lane] >> (4 * h)) & 0xF
        high = (qh[lane] >> (2 * c + h)) & 1
        assert low | (high << 4) == L[0, e]


def test_q6_k_exact_grid_and_byte_layout() -> None:
    # Integers in [-32, 31] times a power of two, with -32 in every 16-value sub-block: sub-scale -128 (int8) and
    # d = -s/128 reproduce them exactly.
    rng = np.random.default_rng(2)
    L = rng.integers(-32, 32, size=(2, 512)).astype(np.float32)
    L[:, ::16] = -32
    s = np.float32(1 / 128)
    x = L * s
    q = quantize_q6_k(x)
    assert q.shape == (2, 2 * 210) and q.dtype == np.uint8
    np.testing.assert_array_equal(dequantize(q, QT.Q6_K), x)

    blk = q[0, :210]
    ql, qh, sc = blk[:128], blk[128:192], blk[192:208].view(np.int8)
    assert sc.tolist() == [-128] * 16
    assert np.frombuffer(blk[208:210].tobytes(), np.float16)[0] == np.float16(-s / 128)
    u = (L[0, :256] + 32).astype(np.int64)  # stored 6-bit values
    for e in range(256):  # value 128h + 32k + l: low nibble in ql[64h + 32(k%2) + l] (high nibble if k>=2),
        h, k, lane = e // 128, (e % 128) // 32, e % 32  # top 2 bits in qh[32h + l] at bit 2k
        low = (ql[64 * h + 32 * (k % 2) + lane] >> (4 * (k // 2))) & 0xF
        high = (qh[32 * h + lane] >> (2 * k)) & 0x3
        assert low | (high << 4) == u[e]


def test_all_zero_input_gives_zero_blocks() -> None:
    z = np.zeros((2, 256), np.float32)
    assert not quantize_q4_k(z).any()
    assert not quantize_q5_k(z).any()
    assert not quantize_q6_k(z).any()  # memset(&y[i], 0, ...) branch


@pytest.mark.parametrize("fn", [quantize_q4_k, quantize_q5_k, quantize_q6_k])
def test_bad_input_is_refused(fn) -> None:
    with pytest.raises(ValueError, match="multiple of 256"):
        fn(np.ones((2, 576), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        fn(np.ones(256, np.float32))
    bad = np.ones((1, 256), np.float32)
    bad[0, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fn(bad)


# ---------------------------------------------------------------------------------------------------- accuracy


def test_round_trip_error_matches_what_the_formats_allow() -> None:
    x = (np.random.default_rng(0).standard_normal((64, 1024)) * 0.02).astype(np.float32)
    err = {
        "Q4_K": _rel_rmse(dequantize(quantize_q4_k(x), QT.Q4_K), x),
        "Q5_K": _rel_rmse(dequantize(quantize_q5_k(x), QT.Q5_K), x),
        "Q6_K": _rel_rmse(dequantize(quantize_q6_k(x), QT.Q6_K), x),
        "Q4_0": _rel_rmse(dequantize(quantize(x, QT.Q4_0), QT.Q4_0), x),
        "Q8_0": _rel_rmse(dequantize(quantize(x, QT.Q8_0), QT.Q8_0), x),
    }
    print("relative RMSE on N(0, 0.02):", {k: round(v, 5) for k, v in err.items()})
    # Measured: Q8_0 0.0054, Q6_K 0.0178, Q5_K 0.0363, Q4_K 0.0715, Q4_0 0.0862.
    assert err["Q8_0"] < err["Q6_K"] < err["Q5_K"] < err["Q4_K"] < err["Q4_0"]
    assert err["Q4_K"] < 0.075 and err["Q6_K"] < 0.019
    assert err["Q4_K"] < 0.88 * err["Q4_0"]  # the min/scale search buys >12% over plain absmax Q4_0


def test_heavy_tailed_and_degenerate_blocks_stay_accurate() -> None:
    x = _heavy_tailed(8, 512, seed=3)
    for qt, fn, bound in [
        (QT.Q4_K, quantize_q4_k, 0.12),
        (QT.Q5_K, quantize_q5_k, 0.07),
        (QT.Q6_K, quantize_q6_k, 0.04),
    ]:
        y = dequantize(fn(x), qt)
        assert np.isfinite(y).all()
        assert _rel_rmse(y, x) < bound
        np.testing.assert_array_equal(y[0, :256], 0.0)
        np.testing.assert_allclose(y[1, 32:64], -0.01, rtol=0.05)  # limited by the 6-bit min / 8-bit scale grid


# ---------------------------------------------------------------------------------------------------- Q4_K_M mix


def test_use_more_bits_layers() -> None:
    assert [i for i in range(8) if use_more_bits(i, 8)] == [0, 3, 6, 7]
    # SmolLM2 (30 layers): first/last eighth plus every third layer in between.
    assert [i for i in range(30) if use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]


def test_q4_k_m_mix_and_fallbacks() -> None:
    n = 8
    for i in range(n):
        expect = QT.Q6_K if i in (0, 3, 6, 7) else QT.Q4_K
        assert k_m_type_for("Q4_K_M", f"blk.{i}.attn_v.weight", i, n, 256) == expect
        assert k_m_type_for("Q4_K_M", f"blk.{i}.ffn_down.weight", i, n, 1024) == expect
        for t in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert k_m_type_for("Q4_K_M", f"blk.{i}.{t}.weight", i, n, 256) == QT.Q4_K
    assert k_m_type_for("Q4_K_M", "output.weight", -1, n, 256) == QT.Q6_K
    assert k_m_type_for("Q4_K_M", "token_embd.weight", -1, n, 256, tied_embeddings=True) == QT.Q6_K
    assert k_m_type_for("Q4_K_M", "token_embd.weight", -1, n, 256, tied_embeddings=False) == QT.Q4_K
    assert k_m_type_for("Q4_K_M", "blk.0.attn_norm.weight", 0, n, 256) == QT.F32
    assert k_m_type_for("Q4_K_M", "blk.0.attn_q.bias", 0, n, 256) == QT.F32

    # SmolLM2 shapes: 576 columns do not fit a 256 super-block.
    fb: list[Fallback] = []
    assert k_m_type_for("Q4_K_M", "blk.4.attn_q.weight", 4, 30, 576, fallbacks=fb) == QT.Q5_0
    assert k_m_type_for("Q4_K_M", "blk.5.attn_v.weight", 5, 30, 576, fallbacks=fb) == QT.Q8_0
    assert k_m_type_for("Q4_K_M", "blk.5.ffn_down.weight", 5, 30, 1536, fallbacks=fb) == QT.Q6_K  # 1536 = 6*256 fits
    assert k_m_type_for("Q4_K_M", "token_embd.weight", -1, 30, 576, fallbacks=fb) == QT.Q8_0
    assert k_m_type_for("Q4_K_M", "blk.0.ffn_up.weight", 0, 30, 100, fallbacks=fb) == QT.F16  # not even 32 fits
    assert [(f.tensor, f.wanted, f.used) for f in fb] == [
        ("blk.4.attn_q.weight", "Q4_K", "Q5_0"),
        ("blk.5.attn_v.weight", "Q6_K", "Q8_0"),
        ("token_embd.weight", "Q6_K", "Q8_0"),
        ("blk.0.ffn_up.weight", "Q4_K", "F16"),
    ]
    assert "576" in fb[0].reason and fb[0].to_dict()["used"] == "Q5_0"


def test_q5_k_m_mix_and_phi3_fused_qkv() -> None:
    """Q5_K_M: the same Q6_K layers, Q5_K elsewhere (Q5_1 when 256 does not divide the row); a fused attn_qkv
    is counted as attn_v in both mixes (measured against llama_model_quantize in test_gguf_export)."""
    n = 8
    for i in range(n):
        more = QT.Q6_K if i in (0, 3, 6, 7) else None
        assert k_m_type_for("Q5_K_M", f"blk.{i}.attn_v.weight", i, n, 256) == (more or QT.Q5_K)
        assert k_m_type_for("Q5_K_M", f"blk.{i}.attn_qkv.weight", i, n, 256) == (more or QT.Q5_K)
        assert k_m_type_for("Q4_K_M", f"blk.{i}.attn_qkv.weight", i, n, 256) == (more or QT.Q4_K)
        assert k_m_type_for("Q5_K_M", f"blk.{i}.ffn_up.weight", i, n, 256) == QT.Q5_K
    assert k_m_type_for("Q5_K_M", "output.weight", -1, n, 256) == QT.Q6_K
    fb: list[Fallback] = []
    assert k_m_type_for("Q5_K_M", "blk.4.attn_q.weight", 4, 30, 576, fallbacks=fb) == QT.Q5_1
    assert [(f.wanted, f.used) for f in fb] == [("Q5_K", "Q5_1")]


# ---------------------------------------------------------------------------------------------------- llama.cpp oracle


def _float32_model_dir(path: Path) -> Path:
    """A tiny Llama saved in float32 whose 2-D weights are heavy-tailed random float32 (full mantissas)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests import tiny

    tok = tiny.build_tokenizer()
    cfg = tiny.tiny_config("llama", vocab_size=len(tok), hidden_size=256, intermediate_size=512)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).float()
    with torch.no_grad():
        for i, (_name, p) in enumerate(sorted(model.named_parameters())):
            if p.ndim == 2:
                rows, cols = p.shape
                p.copy_(torch.from_numpy(_heavy_tailed(rows, cols, seed=10 + i)))
    path.mkdir(parents=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def test_bytes_equal_llama_cpp_reference_quantizer(tmp_path: Path) -> None:
    from qlora_pipeline.kernels.formats.gguf_file import write_gguf

    model_dir = _float32_model_dir(tmp_path / "f32model")
    f32 = tmp_path / "m.F32.gguf"
    write_gguf(model_dir, f32, "F32")
    ref_path = tmp_path / "m.Q4_K_M.llama.gguf"
    llama_oracle.quantize(f32, ref_path, "Q4_K_M")

    src = {t.name: np.array(t.data) for t in GGUFReader(f32).tensors}
    stats: dict[str, list[int]] = {"Q4_K": [0, 0, 0, 0], "Q6_K": [0, 0, 0, 0]}  # equal blocks, blocks, bytes eq, bytes
    for t in GGUFReader(ref_path).tensors:
        if t.tensor_type not in (QT.Q4_K, QT.Q6_K):
            continue
        fn, size = (quantize_q4_k, 144) if t.tensor_type == QT.Q4_K else (quantize_q6_k, 210)
        ours = fn(src[t.name]).reshape(-1, size)
        ref = np.array(t.data).reshape(-1, size)
        s = stats[t.tensor_type.name]
        s[0] += int((ours == ref).all(axis=1).sum())
        s[1] += ref.shape[0]
        s[2] += int((ours == ref).sum())
        s[3] += ref.size
    rates = {k: (v[0] / v[1], v[2] / v[3], v[1]) for k, v in stats.items()}
    print("block / byte equality vs llama.cpp (rate_blocks, rate_bytes, n_blocks):", rates)
    assert stats["Q4_K"][1] > 0 and stats["Q6_K"][1] > 0
    assert rates["Q4_K"][0] == 1.0
    assert rates["Q6_K"][0] == 1.0
