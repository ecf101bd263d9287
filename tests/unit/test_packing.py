"""Packing: several examples per row, positions restarting per example, attention inside each example only.

The oracle is the unpacked batch: a packed batch's summed loss and its LoRA gradients must equal those of the same
examples padded one per row, for every family (Gemma's sliding-window layers with a window shorter than the
examples included), and perturbing one example must leave its row-neighbours' hidden states untouched.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from qlora_pipeline.kernels.lora import inject_lora
from qlora_pipeline.stages.lm.batching import BatchPlan, collate, collate_packed, pack_rows
from qlora_pipeline.stages.lm.formatting import IGNORE_INDEX
from qlora_pipeline.stages.lm.lm_loss import device_attention_masks, summed_loss
from tests import tiny

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3"]


def _examples(n: int, vocab: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """Rows with an unlabelled prompt and a labelled reply, every third labelled throughout (as plain text is), all
    longer than Gemma's test window (8)."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        length = rng.randint(10, 30)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        prompt = 0 if k % 3 == 0 else rng.randint(2, length - 3)
        out.append((ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def _lora_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = tiny.tiny_config(arch, vocab_size=128, sliding_window=8) if arch in ("mistral", "phi3") else None
    model = AutoModelForCausalLM.from_config(cfg or tiny.tiny_config(arch, vocab_size=128)).float()
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] if arch == "phi3" else ["q_proj", "v_proj", "up_proj"]
    inject_lora(model, targets, r=4, alpha=8, dropout=0.0)
    for name, param in model.named_parameters():  # B = 0 at init would give A no gradient to compare
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    return model


def _loss_and_grads(model: torch.nn.Module, batch) -> tuple[float, int, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    total, count = summed_loss(model, batch)
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(total.detach()), count, grads


@pytest.mark.parametrize("arch", FAMILIES)
def test_packed_loss_and_lora_gradients_equal_the_unpacked_batch(arch: str) -> None:
    model = _lora_model(arch)
    examples = _examples(7, 128, seed=1)
    rows = pack_rows([len(x) for x, _ in examples], list(range(7)), capacity=64)
    assert len(rows) < len(examples) and any(len(r) >= 3 for r in rows)
    packed = collate_packed([[examples[i] for i in r] for r in rows], pad_id=0)
    padded = collate(examples, pad_id=0)
    loss_p, n_p, grads_p = _loss_and_grads(model, packed)
    loss_u, n_u, grads_u = _loss_and_grads(model, padded)
    assert n_p == n_u == sum(sum(1 for y in lab[1:] if y != IGNORE_INDEX) for _, lab in examples)
    assert loss_p == pytest.approx(loss_u, rel=1e-5)
    assert packed.input_ids.numel() < padded.input_ids.numel()
    for name, g in grads_u.items():
        torch.testing.assert_close(grads_p[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_no_token_attends_across_an_example_boundary(arch: str) -> None:
    """Changing the examples before and after one in its row changes none of its hidden states; the control
    (the same row read as one sequence, positions not restarting) shows the perturbation would show up."""
    model = _lora_model(arch).eval()
    a, b, c = _examples(3, 128, seed=2)
    a2, c2 = ([(t + 7) % 120 + 3 for t in x] for x, _ in (a, c))
    batches = [collate_packed([[a, b, c]], 0), collate_packed([[(a2, a[1]), b, (c2, c[1])]], 0)]
    start, end = len(a[0]), len(a[0]) + len(b[0])
    with torch.no_grad():
        hidden = [
            model.get_decoder()(input_ids=x.input_ids, position_ids=x.position_ids, use_cache=False).last_hidden_state[
                0, start:end
            ]
            for x in batches
        ]
        assert torch.equal(hidden[0], hidden[1])
        one_sequence = [
            model.get_decoder()(input_ids=x.input_ids, use_cache=False).last_hidden_state[0, start:end] for x in batches
        ]
    assert (one_sequence[0] - one_sequence[1]).abs().max() > 1e-2


@pytest.mark.parametrize("arch", FAMILIES)
def test_masks_built_on_the_device_equal_transformers_own(arch: str) -> None:
    """What an accelerator runs (our 4-D masks, one per attention type where the model takes that, sliding windows of
    8 included) gives the hidden states transformers' own masks give, packed and padded."""
    model = _lora_model(arch).eval()
    examples = _examples(5, 128, seed=3)
    rows = pack_rows([len(x) for x, _ in examples], range(5), capacity=48)
    decoder = model.get_decoder()
    with torch.no_grad():
        for batch in (collate_packed([[examples[i] for i in r] for r in rows], 0), collate(examples, 0)):
            kwargs = {"input_ids": batch.input_ids, "position_ids": batch.position_ids, "use_cache": False}
            ours = decoder(**kwargs, attention_mask=device_attention_masks(model, batch)).last_hidden_state
            theirs = decoder(**kwargs, attention_mask=batch.attention_mask).last_hidden_state
            real = (
                torch.ones_like(batch.input_ids, dtype=torch.bool)
                if batch.attention_mask is None
                else batch.attention_mask.bool()
            )
            torch.testing.assert_close(ours[real], theirs[real], rtol=1e-5, atol=1e-5)


def test_targets_never_cross_from_one_example_into_the_next() -> None:
    a = ([5, 6, 7], [5, 6, 7])  # fully labelled: its first token has no predecessor inside the example
    b = ([8, 9], [8, 9])
    batch = collate_packed([[a, b]], pad_id=0)
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    assert batch.target_positions.tolist() == [0, 1, 3] and batch.targets.tolist() == [6, 7, 9]
    assert batch.attention_mask is None and batch.n_tokens == 5


def test_pack_rows_uses_the_fewest_balanced_rows() -> None:
    """Every example once, no row over capacity, and rows so even that padding to the longest is a few percent."""
    rng = random.Random(0)
    padded = real = 0
    for _ in range(200):
        lengths = [rng.randint(5, 120) for _ in range(8)]
        rows = pack_rows(lengths, range(8), capacity=256)
        assert sorted(i for r in rows for i in r) == list(range(8))
        fills = [sum(lengths[i] for i in r) for r in rows]
        assert max(fills) <= 256 and len(rows) <= -(-sum(lengths) // 256) + 1
        padded += len(rows) * max(fills)
        real += sum(lengths)
    assert 1 - real / padded < 0.05
    assert pack_rows([100, 100, 100], [0, 1, 2], capacity=150) == [[0], [1], [2]]
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([300], [0], capacity=256)


def test_packed_plan_keeps_the_batch_size_and_resumes_at_any_batch() -> None:
    rng = random.Random(1)
    lengths = [rng.randint(5, 60) for _ in range(300)]
    plan = BatchPlan(lengths, batch_size=8, seed=3, pack_to=128)
    first = plan.epoch(0)
    assert first == plan.epoch(0) and first != plan.epoch(1)
    assert sorted(i for batch in first for row in batch for i in row) == list(range(300))
    assert [sum(len(row) for row in b) for b in first] == [8] * 37 + [4]
    full = plan.stream()
    seq = [next(full) for _ in range(len(first) + 10)]  # crosses an epoch boundary
    resumed = plan.stream(start=len(first) - 3)
    assert [next(resumed) for _ in range(13)] == seq[len(first) - 3 :]
