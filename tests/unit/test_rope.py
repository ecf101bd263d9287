"""The rotary embedding as one autograd node (kernels/rope.py) and its Triton twin (kernels/rope_triton.py, under
TRITON_INTERPRET=1 by conftest; compiled for sm_90 without a GPU).

Claims tested: the reference is transformers' function bit for bit, forward and (against autograd) backward; the
twin gives the reference's bits for every layout and dtype the attention hands it, on the interpreter's tile and on
a GPU's; a model patched by ``fuse_rotary_embedding`` trains with the unpatched model's loss and gradients bit for
bit, through the twin too, while another model in the process keeps transformers' ops; Phi-3's partial rotation is
left alone; and the compiled kernel contracts no multiply-add.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.llama import modeling_llama

from qlora_pipeline.kernels import rope, rope_triton
from qlora_pipeline.kernels.rope import (
    fuse_rotary_embedding,
    rope_backward_reference,
    rope_forward_reference,
    rotary_embedding,
)
from tests import tiny
from tests.calls import count_calls
from tests.ptx import probe_counts

BF16, FP32 = torch.bfloat16, torch.float32


def _qkv(batch: int, heads: int, tokens: int, head_dim: int, dtype: torch.dtype, token_major: bool, seed: int):
    """x as the attention hands it: a (batch, heads, tokens, head_dim) view of token-major rows, or contiguous;
    cos and sin as transformers' rotary module makes them (one batch row when positions are shared)."""
    gen = torch.Generator().manual_seed(seed)
    if token_major:
        x = torch.randn(batch, tokens, heads, head_dim, generator=gen).to(dtype).transpose(1, 2)
    else:
        x = torch.randn(batch, heads, tokens, head_dim, generator=gen).to(dtype)
    positions = torch.randint(0, 4096, (batch, tokens), generator=gen).double()
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).double() / head_dim)
    angles = positions[..., None] * inv_freq
    emb = torch.cat((angles, angles), dim=-1)
    return x, emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", [BF16, FP32], ids=["bf16", "fp32"])
def test_the_reference_is_transformers_function_and_autograd_bit_for_bit(dtype: torch.dtype) -> None:
    """Forward against ``apply_rotary_pos_emb`` itself, backward against autograd over it."""
    q, cos, sin = _qkv(2, 3, 9, 64, dtype, True, 0)
    k = _qkv(2, 1, 9, 64, dtype, True, 1)[0]
    g = _qkv(2, 3, 9, 64, dtype, False, 2)[0]
    q_leaf = q.detach().requires_grad_()
    q_ref, k_ref = modeling_llama.apply_rotary_pos_emb(q_leaf, k, cos, sin)
    q_ref.backward(g)
    assert torch.equal(rope_forward_reference(q, cos, sin), q_ref) and torch.equal(
        rope_forward_reference(k, cos, sin), k_ref
    )
    assert torch.equal(rope_backward_reference(g, cos, sin), q_leaf.grad)


@pytest.mark.parametrize("dtype", [BF16, FP32], ids=["bf16", "fp32"])
@pytest.mark.parametrize(
    ("shape", "token_major", "shared_positions"),
    [((2, 9, 37, 64), True, False), ((1, 3, 20, 128), False, True), ((3, 2, 5, 96), True, True)],
    ids=["smollm2-heads", "contiguous-shared-positions", "ragged-head"],
)
def test_the_twin_gives_the_references_bits(dtype, shape, token_major: bool, shared_positions: bool) -> None:
    """Both directions, every layout and dtype the attention hands it; the result is a token-major view as
    transformers' own q and k are."""
    batch, heads, tokens, head_dim = shape
    x, cos, sin = _qkv(batch, heads, tokens, head_dim, dtype, token_major, 3)
    if shared_positions:
        cos, sin = cos[:1], sin[:1]
    g = _qkv(batch, heads, tokens, head_dim, dtype, not token_major, 4)[0]
    (y,) = rope_triton.rope_triton((x,), cos, sin, backward=False)
    (dx,) = rope_triton.rope_triton((g,), cos, sin, backward=True)
    assert y.shape == x.shape and y.dtype == dtype and y.transpose(1, 2).is_contiguous()
    assert torch.equal(y, rope_forward_reference(x, cos, sin))
    assert torch.equal(dx, rope_backward_reference(g, cos, sin))


@pytest.mark.parametrize("dtype", [BF16, FP32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("heads", [(9, 3), (2, 5)], ids=["gqa", "k-wider"])
def test_q_and_k_in_one_launch_are_each_ones_bits(dtype: torch.dtype, heads: tuple[int, int]) -> None:
    """q and k rotated together (the first programs q's rows, the rest k's; q's ragged last tile must not spill
    into k's), both directions: each the reference's bits, and k's layout may differ from q's."""
    q, cos, sin = _qkv(2, heads[0], 37, 64, dtype, True, 7)
    k = _qkv(2, heads[1], 37, 64, dtype, False, 8)[0]
    launches = {"n": 0}
    kernel = rope_triton._rope_kernel

    class _Counted:
        def __getitem__(self, grid):
            launches["n"] += 1
            return kernel[grid]

    rope_triton._rope_kernel = _Counted()
    try:
        yq, yk = rope_triton.rope_triton((q, k), cos, sin, backward=False)
        dq, dk = rope_triton.rope_triton((k.transpose(1, 2).contiguous().transpose(1, 2), q), cos, sin, backward=True)
    finally:
        rope_triton._rope_kernel = kernel
    assert launches["n"] == 2
    assert torch.equal(yq, rope_forward_reference(q, cos, sin)) and torch.equal(yk, rope_forward_reference(k, cos, sin))
    assert torch.equal(dq, rope_backward_reference(k, cos, sin)) and torch.equal(
        dk, rope_backward_reference(q, cos, sin)
    )


def test_the_gpu_tile_gives_the_interpreters_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows are independent: a GPU launch's tile (64 heads of 64 a program) gives the interpreter's bits, ragged
    last tile included."""
    x, cos, sin = _qkv(2, 9, 37, 64, BF16, True, 5)
    k = _qkv(2, 3, 37, 64, BF16, True, 9)[0]
    default = rope_triton.rope_triton((x, k), cos, sin, backward=False)
    real = rope_triton._launch_shape
    monkeypatch.setattr(rope_triton, "_launch_shape", lambda rows, cols, on_gpu: real(rows, cols, True))
    assert rope_triton._launch_shape(2 * 9 * 37, 64, False)[1] == 64
    gpu_tile = rope_triton.rope_triton((x, k), cos, sin, backward=False)
    assert all(torch.equal(a, b) for a, b in zip(gpu_tile, default, strict=True))


def _tiny_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny.tiny_config(arch, vocab_size=384)).to(BF16)
    model.requires_grad_(False)
    model.get_input_embeddings().weight.requires_grad_(True)  # a gradient through every layer's rotation
    return model


def _loss_and_grad(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 384, (2, 16), generator=torch.Generator().manual_seed(1))
    emb = model.get_input_embeddings().weight
    emb.grad = None
    loss = model(ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), emb.grad.clone()


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2"])
def test_a_patched_model_trains_bit_for_bit_as_the_unpatched_one(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loss and gradient through every layer equal the unpatched model's bits, with the reference and with the twin
    forced (as on CUDA); every attention module took the node for q and k, in both directions, and a model left
    unpatched in the same process still runs transformers' ops."""
    plain = _tiny_model(arch)
    want = _loss_and_grad(plain)
    patched = _tiny_model(arch)
    layers = patched.config.num_hidden_layers
    assert fuse_rotary_embedding(patched) == layers
    calls = {"forward": 0, "backward": 0}
    for name in ("forward", "backward"):
        count_calls(monkeypatch, rope, f"rope_{name}", calls, name)
    assert all(torch.equal(a, b) for a, b in zip(_loss_and_grad(patched), want, strict=True))
    assert calls == {"forward": layers, "backward": layers}  # q and k in one call
    assert all(torch.equal(a, b) for a, b in zip(_loss_and_grad(plain), want, strict=True))
    assert calls == {"forward": layers, "backward": layers}, "the unpatched model took the node"
    monkeypatch.setattr(rope, "_takes_triton", lambda x: True)
    assert all(torch.equal(a, b) for a, b in zip(_loss_and_grad(patched), want, strict=True))
    assert want[1].abs().sum() > 0


def test_phi3s_partial_rotation_keeps_its_own_function() -> None:
    """Phi-3 rotates part of each head (its function has another form): nothing is patched."""
    assert fuse_rotary_embedding(_tiny_model("phi3")) == 0


def test_a_call_the_node_does_not_take_falls_back_to_the_original() -> None:
    """Inside a patched module, a call with cos and sin that need gradients (or another unsqueeze dim) goes to
    transformers' function; the node refuses what it cannot rotate."""
    x, cos, sin = _qkv(1, 2, 4, 8, FP32, True, 6)
    wrapped = rope._dispatching(modeling_llama.apply_rotary_pos_emb)
    token = rope._TWIN_ON.set(True)
    try:
        q, _ = wrapped(x, x, cos.requires_grad_(), sin)
        assert type(q.grad_fn).__name__ != "_RotaryEmbeddingBackward"
        q, _ = wrapped(x.requires_grad_(), x, cos.detach(), sin)
        assert type(q.grad_fn).__name__ == "_RotaryEmbeddingBackward"
    finally:
        rope._TWIN_ON.reset(token)
    assert not rope._fits(x, cos[..., :4], sin[..., :4])
    (y,) = rotary_embedding(x, cos=cos.detach(), sin=sin)
    assert torch.equal(y, rope_forward_reference(x, cos.detach(), sin))


_PTX_PROBE = """
import re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from qlora_pipeline.kernels import rope_triton as rt
ptr = {0: "*fp32", 1: "*i16"}  # bf16 travels as int16 bits
for backward in (False, True):
    for kind in (0, 1):
        for fusion in (False, True):
            sig = {**{p: ptr[kind] for p in ("q_ptr", "k_ptr", "cos_ptr", "sin_ptr", "yq_ptr", "yk_ptr")},
                   **{n: "i32" for n in ("q_tiles", "q_rows", "k_rows", "q_heads", "k_heads", "tokens", "stride_qb",
                                          "stride_qh", "stride_qt", "stride_kb", "stride_kh", "stride_kt",
                                          "stride_cb", "head_dim", "half")},
                   "KIND_X": "constexpr", "BACKWARD": "constexpr", "ROWS": "constexpr", "BLOCK": "constexpr"}
            const = {"KIND_X": kind, "BACKWARD": backward, "ROWS": 64, "BLOCK": 64}
            src = ASTSource(fn=rt._rope_kernel, signature=sig,
                            constexprs={(list(sig).index(n),): v for n, v in const.items()})
            options = {"enable_fp_fusion": fusion, "num_warps": 4}
            ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
            print(f"{'backward' if backward else 'forward'}-{kind}", fusion, len(re.findall(r"\\bfma\\.rn\\.f32", ptx)))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the tests above could run the compiled kernel")
def test_the_kernel_compiles_for_sm_90_without_contracted_multiply_adds() -> None:
    """Without a GPU, both directions compile to sm_90 PTX for fp32 and bf16 (no interpreter): with the launch's
    ``enable_fp_fusion=False`` no multiply-add is contracted; with fusion on, fp32's product and sum would be."""
    counts = probe_counts(_PTX_PROBE, timeout_s=300)
    assert len(counts) == 8, counts
    for kernel in ("forward-0", "forward-1", "backward-0", "backward-1"):
        assert counts[(kernel, "False")] == (0,), (kernel, counts)
    assert counts[("forward-0", "True")][0] > 0, "the option matters: Triton would contract v·c + sign·partner·s"
