"""The CPU training attention: the three-op path against torch's SDPA (values and gradients), and a model switched
to it scoring exactly what SDPA scores, padded, packed and unmasked."""

from __future__ import annotations

import copy
import functools
import itertools

import pytest
import torch
import torch.nn.functional as F

from qlora_pipeline.kernels.attention import (
    QUERY_TILE,
    SHORT_KEYS,
    KeyTile,
    additive_mask,
    attended_key_tiles,
    short_attention,
    use_cpu_training_attention,
)
from qlora_pipeline.kernels.slim_activations import saved_tensor_bytes
from tests import tiny


@pytest.mark.parametrize("mask_kind", ["causal", "padded", "additive"])
def test_short_attention_matches_sdpa_values_and_gradients(mask_kind: str) -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 6, 20, 16, generator=g, requires_grad=True)
    k = torch.randn(3, 2, 20, 16, generator=g, requires_grad=True)
    v = torch.randn(3, 2, 20, 16, generator=g, requires_grad=True)
    causal = torch.ones(20, 20, dtype=torch.bool).tril()
    keep = torch.ones(3, 1, 1, 20, dtype=torch.bool)
    keep[1, ..., 14:] = False
    mask = {"causal": None, "padded": causal & keep, "additive": torch.zeros(3, 1, 20, 20).masked_fill(~causal, -1e9)}
    m = mask[mask_kind]
    ours = short_attention(q, k, v, m, 0.25)
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    ref_mask = causal if m is None else m
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=ref_mask, scale=0.25, enable_gqa=True).transpose(1, 2)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    torch.testing.assert_close(ours, ref, atol=2e-6, rtol=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def _packed_keep(rows: list[list[int]]) -> torch.Tensor:
    """The boolean mask of packed rows (causal, no example seeing another), (rows, 1, length, length)."""
    width = max(sum(row) for row in rows)
    segment = torch.full((len(rows), width), -1)
    for r, row in enumerate(rows):
        starts = [0, *torch.tensor(row).cumsum(0).tolist()]
        for k, (a, b) in enumerate(itertools.pairwise(starts)):
            segment[r, a:b] = k
    pos = torch.arange(width)
    return ((pos[:, None] >= pos[None, :])[None] & (segment[:, :, None] == segment[:, None, :]))[:, None]


def test_a_tile_computes_only_the_keys_its_queries_attend() -> None:
    causal = torch.ones(150, 150, dtype=torch.bool).tril()
    assert attended_key_tiles(causal, 150, 150, 64) == [
        KeyTile(0, 64, 0, 64),
        KeyTile(64, 128, 0, 128),
        KeyTile(128, 150, 0, 150),
    ]
    packed = _packed_keep([[40, 60, 92], [50, 142]])  # a tile's span: the union over the batch's rows
    assert attended_key_tiles(packed, 192, 192, 64)[1:] == [KeyTile(64, 128, 40, 128), KeyTile(128, 192, 50, 192)]
    assert attended_key_tiles(_packed_keep([[40, 60, 92]]), 192, 192, 64)[2] == KeyTile(128, 192, 100, 192)
    nowhere = causal.clone()
    nowhere[128:] = False  # queries that attend nowhere keep every key, as the untiled softmax spreads them
    assert attended_key_tiles(nowhere, 150, 150, 64)[-1] == KeyTile(128, 150, 0, 150)
    additive = torch.zeros(150, 150).masked_fill(~causal, -1e9)  # an additive mask may hold biases: not tiled
    assert attended_key_tiles(additive, 150, 150, 64) == [KeyTile(0, 150, 0, 150)]


def test_tiled_packed_attention_matches_sdpa_values_and_gradients() -> None:
    """Rows of 192 packed tokens (three query tiles, examples of different lengths in each row), fp32."""
    assert 2 * QUERY_TILE < 192  # the last tile leaves out the keys before its examples
    g = torch.Generator().manual_seed(2)
    keep = _packed_keep([[100, 92], [30, 70, 50, 42]])
    q = torch.randn(2, 6, 192, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, 192, 16, generator=g, requires_grad=True) for _ in range(2))
    ours = short_attention(q, k, v, keep, 0.25)
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=0.25, enable_gqa=True).transpose(1, 2)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    torch.testing.assert_close(ours, ref, atol=2e-6, rtol=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
        assert a.abs().sum() > 0


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_a_switched_model_scores_what_sdpa_scores(arch: str) -> None:
    """Gemma 3's sliding layers (window 8) check that the masks transformers builds reach the three ops."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny.tiny_config(arch), attn_implementation="sdpa").float()
    switched = copy.deepcopy(model)
    assert use_cpu_training_attention(switched)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (3, 24))
    padded = torch.ones(3, 24, dtype=torch.long)
    padded[1, 17:] = 0
    packed = torch.tensor([list(range(10)) + list(range(14))] * 3)
    for kwargs in ({}, {"attention_mask": padded}, {"position_ids": packed}):
        a, b = model(input_ids=ids, **kwargs).logits, switched(input_ids=ids, **kwargs).logits
        valid = padded.bool() if "attention_mask" in kwargs else torch.ones(3, 24, dtype=torch.bool)
        torch.testing.assert_close(b[valid], a[valid], atol=1e-5, rtol=1e-4)
    long_ids = torch.randint(3, vocab, (1, SHORT_KEYS + 8))  # past the threshold: torch's SDPA itself
    assert torch.equal(model(input_ids=long_ids).logits, switched(input_ids=long_ids).logits)


def _plain_ops_attention(q, k, v, mask, scaling, additive=False):
    """The three ops under plain autograd (what _ShortAttention replaces): it keeps the probabilities. The mask
    filled in (SDPA's boolean semantics) or, `additive`, added as transformers' eager attention adds it."""
    b, h, n, d = q.shape
    grouped = (q * scaling).reshape(b, k.shape[1], h // k.shape[1] * n, d)
    scores = torch.matmul(grouped, k.transpose(-1, -2)).view(b, h, n, k.shape[2])
    low = torch.finfo(scores.dtype).min
    bias = torch.zeros(mask.shape, dtype=scores.dtype).masked_fill(~mask, low)
    scores = scores + bias if additive else scores.masked_fill(~mask, low)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype).view(b, k.shape[1], -1, k.shape[2])
    return torch.matmul(probs, v).view(b, h, n, d).transpose(1, 2).contiguous()


def test_short_attention_recomputes_what_autograd_keeps_and_gives_its_gradients_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, s, 48, 16, generator=g).bfloat16().requires_grad_() for s in (6, 2, 2))
    keep = torch.ones(48, 48, dtype=torch.bool).tril()[None, None] & (torch.arange(48) < 40)[None, None, None]
    grads, outs = [], []
    for fn in (short_attention, _plain_ops_attention):
        out = fn(q, k, v, keep, 0.25)
        outs.append(out)
        grads.append(torch.autograd.grad(out.float().square().sum(), (q, k, v)))
    assert torch.equal(outs[0], outs[1])
    for mine, plain in zip(*grads, strict=True):
        assert torch.equal(mine, plain) and mine.abs().sum() > 0
    scores = 2 * 6 * 48 * 48
    kept = saved_tensor_bytes(lambda: short_attention(q, k, v, keep, 0.25))
    kept_plain = saved_tensor_bytes(lambda: _plain_ops_attention(q, k, v, keep, 0.25))
    assert kept_plain - kept >= scores * 6  # the fp32 probabilities and their 16-bit copy are not kept


def test_a_row_that_attends_nowhere_follows_eager_attention() -> None:
    """Left padding (bf16, the training dtype): query 0 of the second row sees no key. Its output (uniform
    probabilities) is what both mask semantics give; its gradient is eager attention's (the mask added), and every
    other row's is SDPA's too."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, s, 12, 8, generator=g).bfloat16().requires_grad_() for s in (4, 2, 2))
    keep = torch.ones(12, 12, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
    keep[1, 0, :, :3] = False  # the second row's first three positions are padding
    outs, grads = [], []
    for fn in (short_attention, functools.partial(_plain_ops_attention, additive=True), _plain_ops_attention):
        outs.append(fn(q, k, v, keep, 0.25))
        grads.append(torch.autograd.grad(outs[-1].float().square().sum(), (q, k, v)))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    for mine, eager, sdpa in zip(*grads, strict=True):
        assert torch.equal(mine, eager)
        assert torch.equal(mine[0], sdpa[0])  # the first row attends somewhere everywhere: the same
    assert not torch.equal(grads[0][1][1], grads[2][1][1])  # the padding query's gradient reaches its keys


def test_one_mask_is_planned_once_for_every_layer_and_anew_when_it_changes(monkeypatch) -> None:
    """Every layer of a forward pass gets the same mask tensor: its tiles and additive masks are built once, and a
    mask changed in place or a new mask is planned again (the results follow the mask they were given)."""
    from qlora_pipeline.kernels import attention

    planned = []
    real = attention.attended_key_tiles
    monkeypatch.setattr(attention, "attended_key_tiles", lambda *a, **k: planned.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 6, 150, 16, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 150, 16, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 150, 16, generator=g, requires_grad=True)
    mask = _packed_keep([[40, 60, 50], [90, 60]])

    def against_sdpa() -> None:
        ours = short_attention(q, k, v, mask, 0.25)
        ours.square().sum().backward()
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=True).transpose(1, 2)
        torch.testing.assert_close(ours, ref, atol=2e-6, rtol=1e-5)

    for _ in range(3):  # three layers: forward and backward each
        against_sdpa()
    assert len(planned) == 1
    mask[1, ..., 120:, 90:120] = False  # in place: a third example in the second row
    against_sdpa()
    assert len(planned) == 2
    mask = _packed_keep([[150], [150]])
    against_sdpa()
    assert len(planned) == 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_sdpa_bias_built_once_gives_sdpa_its_own_bits(dtype: torch.dtype) -> None:
    """A packed row's mask (two examples, then padding attending itself) as the float bias handed to every layer:
    SDPA's output and gradients are those it gives the bool mask, which it converts to this bias in every call."""
    torch.manual_seed(0)
    segment = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2])
    pos = torch.arange(8)
    keep = ((pos[:, None] >= pos[None, :]) & (segment[:, None] == segment[None, :]))[None, None]
    bias = additive_mask(keep, dtype, float("-inf"))
    assert bias.dtype == dtype and set(bias.unique().tolist()) == {0.0, float("-inf")}
    q, k, v = (torch.randn(2, 3, 8, 16, dtype=dtype, requires_grad=True) for _ in range(3))
    g = torch.randn(2, 3, 8, 16, dtype=dtype)
    results = []
    for mask in (keep, bias):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        results.append((out, *torch.autograd.grad(out, (q, k, v), g)))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_gemma2_keeps_its_soft_capped_eager_attention_whatever_transformers_defaults_to(monkeypatch, tmp_path) -> None:
    """transformers 5.17 (a GPU node's image) lets Gemma 2 default to SDPA, which drops the cap on its attention
    scores; 5.23 picks eager. With 5.17's default put back, the 16-bit and the NF4 loaders still run eager, and the
    cap matters: SDPA's logits are not eager's."""
    from transformers import AutoModelForCausalLM
    from transformers.models.gemma2 import modeling_gemma2

    from qlora_pipeline.kernels.formats.bnb_loader import load_4bit_model, save_4bit_checkpoint
    from qlora_pipeline.stages.lm.modelio import load_16bit_model

    folder = tiny.make_model_dir(tmp_path / "gemma2", "gemma2", attn_logit_softcapping=1.0)
    monkeypatch.setattr(modeling_gemma2.Gemma2PreTrainedModel, "_supports_sdpa", True)
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert plain.config._attn_implementation == "sdpa"  # 5.17's default, put back
    ours = load_16bit_model(folder, torch.float32)
    assert ours.config._attn_implementation == "eager"
    save_4bit_checkpoint(folder, tmp_path / "nf4")
    assert load_4bit_model(tmp_path / "nf4", compute_dtype=torch.float32).config._attn_implementation == "eager"

    ids = torch.randint(3, plain.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for model in (plain, ours):  # scores large enough for the cap to bite
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(20)
        try:
            uncapped = plain(ids).logits
        except ValueError as exc:  # 5.23's SDPA refuses a cap
            assert "softcap" in str(exc)
            uncapped = None
        plain.set_attn_implementation("eager")
        capped = plain(ids).logits
        assert torch.equal(ours(ids).logits, capped)
    if uncapped is not None:  # 5.17's SDPA drops it
        assert (uncapped - capped).abs().max() > 0.05 * capped.abs().max()
