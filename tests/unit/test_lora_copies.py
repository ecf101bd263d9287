"""A training step's compute-dtype copies of A and B (kernels/lora_copies.py).

Claims tested: training with the copies is training without them, bit for bit (NF4 and 16-bit bases, with and
without recomputed layers), because a copy is the cast it replaces; the per-projection casts of A and B leave a
step's forward for one batched copy; the copies exist only inside the scope, so an optimizer step between scopes is
always seen; a refresh while an earlier graph still needs its copies fails that backward loudly; and a model whose
adapters already compute in their own dtype takes none.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from qlora_pipeline.kernels.linear4bit import Linear4bit
from qlora_pipeline.kernels.lora import inject_lora, lora_modules
from qlora_pipeline.kernels.lora_copies import ComputeCopies
from qlora_pipeline.kernels.nf4 import quantize_nf4
from qlora_pipeline.kernels.optim.adamw import AdamW
from tests.unit.test_lora import ALL_PROJ, input_ids, randomize_lora, tiny_llama

BF16 = torch.bfloat16


def _model(nf4: bool, compute_dtype: torch.dtype = BF16) -> nn.Module:
    """A tiny bf16 Llama, its projections NF4 (the QLoRA path) or 16-bit, LoRA with dropout on all of them."""
    model = tiny_llama(dtype=BF16)
    if nf4:
        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, child in list(parent.named_children()):
                    if isinstance(child, nn.Linear):
                        setattr(parent, name, Linear4bit(quantize_nf4(child.weight.float()), compute_dtype=BF16))
    torch.manual_seed(5)
    inject_lora(model, ALL_PROJ, r=4, alpha=8, dropout=0.1, compute_dtype=compute_dtype)
    randomize_lora(model)
    return model.train()


def _train(model: nn.Module, copies: bool, steps: int = 3) -> tuple[list[float], list[torch.Tensor]]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = AdamW(trainable, lr=1e-2)
    scope = ComputeCopies(model)
    ids = input_ids()
    losses = []
    for step in range(steps):
        torch.manual_seed(11 + step)
        with scope.fresh() if copies else contextlib.nullcontext():
            loss = model(ids, labels=ids, use_cache=False).loss
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, [p.detach().clone() for p in trainable]


@pytest.mark.parametrize("nf4", [True, False], ids=["nf4-base", "bf16-base"])
@pytest.mark.parametrize("recompute", [False, True], ids=["kept", "recomputed"])
def test_training_with_the_copies_is_training_without_them_bit_for_bit(nf4: bool, recompute: bool) -> None:
    runs = []
    for copies in (False, True):
        model = _model(nf4)
        if recompute:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        runs.append(_train(model, copies))
    (losses, params), (losses_c, params_c) = runs
    assert losses == losses_c and losses[-1] < losses[0]
    assert len(params) == 28 and all(torch.equal(a, b) for a, b in zip(params, params_c, strict=True))


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def test_a_steps_forward_casts_of_a_and_b_become_one_batched_copy() -> None:
    model = _model(nf4=True)
    scope = ComputeCopies(model)
    projections = len(lora_modules(model))
    assert len(scope.modules) == projections == 14 and scope.nbytes == sum(2 * p.numel() for p in scope.masters)
    ids = input_ids()
    counts = []
    for copies in (False, True):
        with _Ops() as ops, scope.fresh() if copies else contextlib.nullcontext():
            model(ids, labels=ids, use_cache=False).loss.backward()
        counts.append(ops.count)
    without, with_copies = counts
    assert without["aten._to_copy"] - with_copies["aten._to_copy"] == 2 * projections
    assert with_copies["aten._foreach_copy_"] == 1 and without["aten._foreach_copy_"] == 0


def test_the_copies_live_only_inside_the_scope_and_follow_the_masters() -> None:
    model = _model(nf4=True)
    scope = ComputeCopies(model)
    modules = list(lora_modules(model).values())
    assert all(m.compute_copies is None for m in modules)
    for _ in range(2):
        with scope.fresh():
            for m in modules:
                a, b = m.compute_copies
                assert torch.equal(a, m.lora_A.to(BF16)) and torch.equal(b, m.lora_B.to(BF16))
        assert all(m.compute_copies is None for m in modules)
        with torch.no_grad():  # what an optimizer step or a resume does between scopes
            for m in modules:
                m.lora_A.add_(0.25)
    with pytest.raises(ValueError), scope.fresh():
        raise ValueError("a failed step")
    assert all(m.compute_copies is None for m in modules)


def test_a_refresh_under_a_pending_backward_fails_that_backward() -> None:
    model = _model(nf4=True)
    scope = ComputeCopies(model)
    ids = input_ids()
    with scope.fresh():
        loss = model(ids, labels=ids, use_cache=False).loss
    with scope.fresh():
        pass
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_adapters_that_compute_in_their_own_dtype_take_no_copies() -> None:
    """fp32 compute (a CPU without bf16) over fp32 adapters: nothing to cast, nothing copied."""
    model = _model(nf4=False, compute_dtype=torch.float32)
    assert ComputeCopies(model).modules == []
