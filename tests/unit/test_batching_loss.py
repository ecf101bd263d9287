"""Length-grouped batching and the reply-only loss (checked against transformers' own loss)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from qlora_pipeline.stages.lm.batching import BatchPlan, collate, epoch_batches, eval_batches
from qlora_pipeline.stages.lm.lm_loss import heldout_loss, summed_loss
from tests import tiny


def test_epoch_batches_cover_every_row_once_and_group_lengths() -> None:
    lengths = [(i * 37) % 200 + 5 for i in range(300)]
    batches = epoch_batches(lengths, 8, seed=0, epoch=0)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(300))
    assert epoch_batches(lengths, 8, seed=0, epoch=0) == batches
    assert epoch_batches(lengths, 8, seed=0, epoch=1) != batches
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    rand = [list(range(j, min(j + 8, 300))) for j in range(0, 300, 8)]
    padded_random = sum(len(b) * max(lengths[i] for i in b) for b in rand)
    assert padded < 0.8 * padded_random


def test_batch_stream_resumes_at_any_position() -> None:
    lengths = list(range(5, 45))
    full = BatchPlan(lengths, 4, seed=3).stream()
    seq = [next(full) for _ in range(25)]  # crosses an epoch boundary (10 batches per epoch)
    resumed = BatchPlan(lengths, 4, seed=3).stream(start=13)
    assert [next(resumed) for _ in range(12)] == seq[13:]


def test_reply_only_loss_matches_transformers_loss() -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny.tiny_config(vocab_size=128)).eval()
    rows = []
    for n, start in ((12, 3), (7, 2), (20, 15)):
        ids = torch.randint(3, 128, (n,)).tolist()
        labels = [-100] * start + ids[start:]
        rows.append((ids, labels))
    batch = collate(rows, pad_id=0)
    with torch.no_grad():
        total, count = summed_loss(model, batch)
        ref = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
    assert count == (12 - 3) + (7 - 2) + (20 - 15) - 0
    assert torch.allclose(total / count, ref.loss, atol=1e-5)
    # token-weighted over batches: same value whatever the batch size
    a = heldout_loss(model, rows, batch_size=1, pad_id=0)
    b = heldout_loss(model, rows, batch_size=3, pad_id=0)
    assert abs(a["loss"] - float(ref.loss)) < 1e-5 and abs(b["loss"] - a["loss"]) < 1e-5
    assert eval_batches([3, 9, 1], 2) == [[1, 0], [2]]


def test_frozen_head_cross_entropy_matches_autograd_of_the_plain_loss() -> None:
    import torch.nn.functional as F

    from qlora_pipeline.kernels.fused_ce import frozen_head_cross_entropy

    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        w = torch.randn(300, 24, dtype=dtype)
        h1 = torch.randn(37, 24, dtype=dtype, requires_grad=True)
        h2 = h1.detach().clone().requires_grad_(True)
        y = torch.randint(0, 300, (37,))
        ours = frozen_head_cross_entropy(h1, w, y, chunk=8)  # several chunks, a ragged last one
        ref = F.cross_entropy((h2 @ w.t()).float(), y, reduction="sum")
        assert torch.allclose(ours, ref, rtol=tol)
        (2.5 * ours).backward()
        (2.5 * ref).backward()
        assert torch.allclose(h1.grad.float(), h2.grad.float(), atol=tol * 10, rtol=tol), (
            (h1.grad - h2.grad).abs().max()
        )
    w.requires_grad_(True)
    with pytest.raises(ValueError, match="needs a frozen projection"):
        frozen_head_cross_entropy(h1, w, y)
