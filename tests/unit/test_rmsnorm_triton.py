"""The Triton RMSNorm (kernels/rmsnorm_triton.py) against its torch reference (kernels/rmsnorm.py), under
TRITON_INTERPRET=1 (conftest), and compiled for sm_90 without a GPU.

Claims tested: every rounding point is the reference's (bit-identical where the row's sums are exact in fp32, so
only the summation order could differ); on random rows within one rounding of the reference, forward and backward,
for every dtype pairing the dispatcher sends it; the training norm (``_FrozenRMSNorm``) takes it where the dispatcher
says; and the compiled kernels use IEEE-rounded sqrt and division and no contracted multiply-add.
"""

from __future__ import annotations

import pytest
import torch

from qlora_pipeline.kernels import rmsnorm
from qlora_pipeline.kernels.rmsnorm import rmsnorm_backward_reference, rmsnorm_forward_reference
from qlora_pipeline.kernels.rmsnorm_triton import rmsnorm_backward_triton, rmsnorm_forward_triton
from tests.calls import count_calls
from tests.ptx import probe_counts

BF16, FP32 = torch.bfloat16, torch.float32
PAIRS = [(BF16, BF16), (FP32, FP32), (BF16, FP32), (FP32, BF16)]
"""(x dtype, weight dtype): a bf16 model, an fp32 model, and the two mixed ones promotion makes."""


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units of the last place of bf16 at b."""
    spacing = 2.0**-7
    scale = torch.exp2(torch.floor(torch.log2(b.double().abs().clamp_min(1e-30))))
    return (a.double() - b.double()).abs() / (scale * spacing)


def _rows(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * torch.rand((*shape[:-1], 1), generator=gen) * 4).to(dtype)


@pytest.mark.parametrize(("x_dtype", "w_dtype"), PAIRS, ids=lambda d: str(d).removeprefix("torch."))
def test_bit_identical_where_the_sums_are_exact(x_dtype: torch.dtype, w_dtype: torch.dtype) -> None:
    """Small integers times powers of two, 512 columns: every sum of the row is exact in fp32 in any order and the
    mean's division by 512 is exact, so the twin must give the reference's bits forward and backward: this pins
    each rounding (x·r to x's dtype before the weight, y to promote(weight, x), grad·weight twice) in its place."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randint(-8, 9, (6, 512), generator=gen) * 2.0 ** torch.randint(-3, 2, (6, 1), generator=gen)).to(x_dtype)
    w = (torch.randint(1, 17, (512,), generator=gen) / 8).to(w_dtype)
    g = (torch.randint(-4, 5, (6, 512), generator=gen) / 8).to(torch.promote_types(x_dtype, w_dtype))
    y_ref, y = rmsnorm_forward_reference(x, w, 1e-5), rmsnorm_forward_triton(x, w, 1e-5)
    assert y.dtype == y_ref.dtype and torch.equal(y, y_ref)
    dx_ref, dx = rmsnorm_backward_reference(x, w, 1e-5, g), rmsnorm_backward_triton(x, w, 1e-5, g)
    assert dx.dtype == x_dtype and torch.equal(dx, dx_ref)


@pytest.mark.parametrize(("x_dtype", "w_dtype"), PAIRS, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", [(5, 576), (2, 3, 100)], ids=["smollm2-rows", "ragged"])
def test_within_one_rounding_of_the_reference(x_dtype, w_dtype, shape: tuple[int, ...]) -> None:
    """Random rows (a ragged width too), forward and backward. In bf16 the other summation order almost never
    reaches the rounded result: at most one unit in the last place, almost every element the same bits. In fp32
    it does, and backward's two terms cancel, so the bound is on the row's scale: within 4 units in the last place
    of the row's largest value. The forward is no further from the float64 truth than the reference by more than
    two units of the truth's."""
    x = _rows(shape, x_dtype, 1)
    w = (1 + torch.randn(shape[-1], generator=torch.Generator().manual_seed(3)) / 4).to(w_dtype)
    g = _rows(shape, torch.promote_types(x_dtype, w_dtype), 2)
    for ref, got in (
        (rmsnorm_forward_reference(x, w, 1e-6), rmsnorm_forward_triton(x, w, 1e-6)),
        (rmsnorm_backward_reference(x, w, 1e-6, g), rmsnorm_backward_triton(x, w, 1e-6, g)),
    ):
        assert got.shape == ref.shape and got.dtype == ref.dtype
        if ref.dtype == BF16:
            assert _ulps(got, ref).max() <= 1 and (got == ref).double().mean() >= 0.99
        else:
            row_unit = ref.double().abs().amax(-1, keepdim=True) * 2.0**-23
            assert ((got.double() - ref.double()).abs() <= 4 * row_unit).all()
    x64 = x.double()
    truth = w.double() * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)
    ref_err = (rmsnorm_forward_reference(x, w, 1e-6).double() - truth).abs()
    got_err = (rmsnorm_forward_triton(x, w, 1e-6).double() - truth).abs()
    unit = truth.abs() * (2.0**-7 if torch.promote_types(x_dtype, w_dtype) == BF16 else 2.0**-23)
    assert (got_err <= ref_err + 2 * unit).all()


@pytest.mark.parametrize("shape", [(37, 576), (300, 128), (3, 4096)], ids=["hidden", "head", "wide"])
def test_the_gpu_tile_gives_the_interpreters_bits(shape: tuple[int, int], monkeypatch) -> None:
    """Rows are independent: the tile a GPU launch uses (4,096 elements: 4 rows of a 576-wide norm, 32 of a 128-wide
    head norm, one of 4,096) gives the bits of the interpreter's 64 rows a program, ragged last tile included."""
    from qlora_pipeline.kernels import rmsnorm_triton

    x, g = _rows(shape, BF16, 5), _rows(shape, BF16, 6)
    w = (1 + torch.randn(shape[-1], generator=torch.Generator().manual_seed(7)) / 4).to(BF16)
    default = rmsnorm_forward_triton(x, w, 1e-5), rmsnorm_backward_triton(x, w, 1e-5, g)
    real = rmsnorm_triton._launch_shape
    monkeypatch.setattr(rmsnorm_triton, "_launch_shape", lambda rows, cols, on_gpu: real(rows, cols, True))
    assert rmsnorm_triton._launch_shape(*shape, False)[1] == max(1, 4096 // triton_next_pow2(shape[-1]))
    gpu_tiled = rmsnorm_forward_triton(x, w, 1e-5), rmsnorm_backward_triton(x, w, 1e-5, g)
    assert all(torch.equal(a, b) for a, b in zip(default, gpu_tiled, strict=True))


def triton_next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def test_the_training_norm_takes_the_twin_where_the_dispatcher_says(monkeypatch) -> None:
    """``_FrozenRMSNorm`` (the slim activations' norm) runs kernels/rmsnorm.py's dispatch: forced onto the twin
    here (on CUDA it is the default), its loss and gradients through a tiny Llama are the reference's within bf16
    rounding, and both directions really went through the twin."""
    from transformers import AutoModelForCausalLM

    from qlora_pipeline.kernels import rmsnorm_triton, slim_activations
    from tests import tiny

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny.tiny_config("llama", vocab_size=384)).to(BF16)
    model.requires_grad_(False)  # frozen norms, as in training: the slim norm's path
    slim_activations.slim_saved_activations(model)
    ids = torch.randint(3, 384, (2, 16), generator=torch.Generator().manual_seed(1))
    emb = model.get_input_embeddings()
    emb.weight.requires_grad_(True)
    runs, calls = [], {"forward": 0, "backward": 0}
    for twin in (False, True):
        if twin:
            monkeypatch.setattr(rmsnorm, "_takes_triton", lambda x, w: True)
            for name in ("forward", "backward"):
                count_calls(monkeypatch, rmsnorm_triton, f"rmsnorm_{name}_triton", calls, name)
        emb.weight.grad = None
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        runs.append((loss.detach(), emb.weight.grad.clone()))
    n_norms = 2 * model.config.num_hidden_layers + 1
    assert calls == {"forward": n_norms, "backward": n_norms}
    assert abs(runs[1][0].item() - runs[0][0].item()) <= 1e-3 * abs(runs[0][0].item())
    rel = (runs[1][1].double() - runs[0][1].double()).norm() / runs[0][1].double().norm()
    assert runs[0][1].abs().sum() > 0 and rel < 1e-2, rel


_PTX_PROBE = """
import re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from qlora_pipeline.kernels import rmsnorm_triton as rt
ptr = {0: "*fp32", 1: "*i16"}  # bf16 travels as int16 bits
for name, kernel, ptrs in (("forward", rt._rmsnorm_forward_kernel, ("x_ptr", "w_ptr", "y_ptr")),
                           ("backward", rt._rmsnorm_backward_kernel, ("x_ptr", "w_ptr", "g_ptr", "dx_ptr"))):
    for kind in (0, 1):
        for fusion in (False, True):
            sig = {**{p: ptr[kind] for p in ptrs}, "n_rows": "i32", "n_cols": "i32", "eps": "fp32",
                   "X_KIND": "constexpr", "W_KIND": "constexpr", "Y_KIND": "constexpr", "ROWS": "constexpr",
                   "BLOCK": "constexpr"}
            const = {"X_KIND": kind, "W_KIND": kind, "Y_KIND": kind, "ROWS": 4, "BLOCK": 1024}
            src = ASTSource(fn=kernel, signature=sig, constexprs={(list(sig).index(n),): v for n, v in const.items()})
            options = {"enable_fp_fusion": fusion, "num_warps": 4}
            ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
            count = lambda pattern: len(re.findall(pattern, ptx))
            print(f"{name}-{kind}", fusion, count(r"\\bfma\\.rn\\.f32"), count(r"\\bdiv\\.rn\\.f32"),
                  count(r"\\bsqrt\\.rn\\.f32"), count(r"\\b(div|sqrt|rsqrt)\\.approx\\.f32"))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the tests above could run the compiled kernel")
def test_the_kernels_compile_for_sm_90_with_ieee_ops_only() -> None:
    """Without a GPU, both kernels compile to sm_90 PTX for fp32 and bf16 rows (no interpreter): with the launch's
    ``enable_fp_fusion=False`` no multiply-add is contracted, and the rsqrt is an IEEE sqrt and division."""
    counts = probe_counts(_PTX_PROBE, timeout_s=300)
    assert len(counts) == 8, counts
    for kernel in ("forward-0", "forward-1", "backward-0", "backward-1"):
        fma_off, div_rn, sqrt_rn, approx = counts[(kernel, "False")]
        assert fma_off == 0 and div_rn >= 1 and sqrt_rn >= 1 and approx == 0, (kernel, counts)
    assert counts[("backward-0", "True")][0] > 0, "the option matters: Triton would contract gw * r + grad_sq * 2x"
