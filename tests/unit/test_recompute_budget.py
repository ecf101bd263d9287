"""Partial recomputation: how many layers a batch recomputes, that it changes no gradient, and what it keeps."""

from __future__ import annotations

import pytest
import torch

from qlora_pipeline.stages.contract.memory_plan import ModelShape, recompute_budget, train_shape
from qlora_pipeline.stages.contract.params import parse_params
from tests.memory_probe import PROBES, Probe, measure, sizes

SMOLLM2 = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "intermediate_size": 1536,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}


def _budget(**train: object):
    params = parse_params({"train": train})
    return recompute_budget(ModelShape.from_config(SMOLLM2), train_shape(params, SMOLLM2, "cpu"))


def test_a_batch_recomputes_the_fewest_layers_that_keep_it_within_the_budget() -> None:
    budget = _budget(compute_dtype="bfloat16")  # checkpoint_min_tokens 512; bf16 whatever this CPU multiplies
    assert budget.layers == 30 and budget.input_per_token == 576 * 2
    assert _budget(compute_dtype="float32").input_per_token == 576 * 4
    limit = budget.peak(512, 0)
    assert [budget.recomputed_layers(n) for n in (1, 256, 511, 512)] == [0, 0, 0, 0]
    assert budget.recomputed_layers(800) == 12  # 8 rows of 100 tokens: 12 of SmolLM2's 30 layers, not 30
    previous = 0
    for n in range(513, 8193, 7):
        k = budget.recomputed_layers(n)
        assert k >= previous, n  # longer batches never recompute fewer layers
        assert k == budget.layers or budget.peak(n, k) <= limit, n
        assert budget.peak(n, k - 1) > limit, n  # and no fewer would do
        previous = k
    assert budget.recomputed_layers(8192) == budget.layers  # past what the budget can hold: all of them
    every = _budget(checkpoint_min_tokens=0, compute_dtype="bfloat16")
    assert every.recomputed_layers(1) == 30  # 0: every layer of every batch


def test_partial_recomputation_gives_the_same_gradients_bit_for_bit() -> None:
    """Recomputing the first k layers replays their forward (dropout masks included): every LoRA gradient equals
    the one with no recomputation and with all of it."""
    from qlora_pipeline.kernels.lora import inject_lora
    from qlora_pipeline.stages.lm.recompute import checkpointed_layers, enable_checkpointing, set_recomputed_layers
    from tests import tiny

    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny.tiny_config("llama", num_hidden_layers=4)).to(torch.bfloat16)
    inject_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 4, 8, 0.1)
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in n)
        if ".lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    enable_checkpointing(model)
    model.train()
    ids = torch.randint(3, 384, (2, 48), generator=torch.Generator().manual_seed(1))
    grads, calls = [], []
    for k in (0, 2, 4):
        set_recomputed_layers(model, k)
        counted = [0] * 4
        hooks = [
            layer.self_attn.q_proj.register_forward_hook(lambda *_, i=i, c=counted: c.__setitem__(i, c[i] + 1))
            for i, layer in enumerate(checkpointed_layers(model))
        ]
        torch.manual_seed(11)
        model(ids, labels=ids, use_cache=False).loss.backward()
        for h in hooks:
            h.remove()
        calls.append(counted)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        model.zero_grad(set_to_none=True)
    assert calls == [[1, 1, 1, 1], [2, 2, 1, 1], [2, 2, 2, 2]]  # the first k layers ran forward again
    assert len(grads[0]) == 4 * 7 * 2
    for name, g in grads[0].items():
        assert g.abs().sum() > 0, name
        assert torch.equal(grads[1][name], g) and torch.equal(grads[2][name], g), name


@pytest.mark.parametrize("index", [len(PROBES) - 1], ids=lambda i: PROBES[i].label)
def test_a_partly_recomputed_step_keeps_less_than_none_and_more_than_all(index: int) -> None:
    """Measured (torch's allocation tracker): a 512-token step on a 320-token budget recomputes 2 of 4 layers and
    peaks between the same step recomputing none and recomputing every layer, where its plan puts it."""
    partial = PROBES[index]
    assert partial.recompute_tokens == 320 and partial.sizes == sizes(vocab_size=384, num_hidden_layers=4)
    from transformers import LlamaConfig

    from tests import tiny

    config = {**tiny.tiny_config("llama", **partial.sizes).to_dict(), "architectures": ["LlamaForCausalLM"]}
    assert isinstance(tiny.tiny_config("llama"), LlamaConfig)
    params = parse_params({"train": {"checkpoint_min_tokens": 320}, "data": {"max_length": partial.seq}})
    budget = recompute_budget(ModelShape.from_config(config), train_shape(params, config, "cpu"))
    assert budget.recomputed_layers(partial.batch * partial.seq) == 2
    peak, plan = measure(partial)
    none, _ = measure(Probe("llama", partial.sizes, partial.batch, partial.seq, False))
    every, _ = measure(Probe("llama", partial.sizes, partial.batch, partial.seq, True))
    assert every < peak < none, (every, peak, none)
    assert abs(plan.device_peak - peak) / peak < 0.10, (plan.as_dict(), peak)


def test_auto_is_512_on_a_cpu_and_what_the_memory_holds_on_a_gpu() -> None:
    """train.checkpoint_min_tokens auto: 512 on a CPU and in prepare's fit check; on a GPU, the largest budget whose
    planned step fits the share of memory auto may plan with: every token of the longest batch on an 80 GiB card,
    the floor on a card that holds nothing more, and in between the exact edge where the plan stops fitting."""
    from dataclasses import replace

    from qlora_pipeline.stages.contract.memory_fit import AUTO_RECOMPUTE_SHARE, recompute_tokens_that_fit, usable_bytes
    from qlora_pipeline.stages.contract.memory_plan import plan_train

    params = parse_params({"train": {"compute_dtype": "bfloat16"}, "data": {"max_length": 1024}})
    assert params.train.checkpoint_min_tokens == "auto" and _budget(compute_dtype="bfloat16").tokens == 512
    shape, t = ModelShape.from_config(SMOLLM2), train_shape(params, SMOLLM2, "cuda")
    assert t.recompute_budget_tokens == 512 and t.tokens == 8 * 1024  # the fit check plans with the floor

    def peak(tokens: int) -> int:
        return plan_train(shape, replace(t, recompute_budget_tokens=tokens)).device_peak

    assert recompute_tokens_that_fit(shape, t, 80 * 2**30) == t.tokens  # the whole batch: nothing recomputes
    assert peak(t.tokens) > peak(2048) > peak(512)  # a larger budget keeps more
    capacity = int((peak(2048) / AUTO_RECOMPUTE_SHARE + 512 * 2**20) / 0.9) + 2**20  # 2,048 tokens just fit
    edge = recompute_tokens_that_fit(shape, t, capacity)
    limit = AUTO_RECOMPUTE_SHARE * usable_bytes(capacity)
    assert 2048 <= edge < t.tokens and peak(edge) <= limit < peak(edge + 1), (edge, limit)
    assert recompute_tokens_that_fit(shape, t, 2**30) == 512  # 1 GiB: even the floor does not fit; keep it
    off = train_shape(parse_params({"train": {"gradient_checkpointing": False}}), SMOLLM2, "cuda")
    assert recompute_tokens_that_fit(shape, off, 80 * 2**30) == off.recompute_budget_tokens


@pytest.mark.parametrize(("given", "device"), [("auto", "cuda"), ("auto", "cpu"), (300, "cuda")])
def test_the_train_stage_sizes_auto_from_the_gpu_memory_it_sees(
    monkeypatch: pytest.MonkeyPatch, given: object, device: str
) -> None:
    """The train loop's budget (stages/lm/recompute.py): on a GPU, auto comes from what the device has free plus
    what this process holds (after the model is loaded); a number is kept as given, and a CPU takes 512."""
    from types import SimpleNamespace

    from qlora_pipeline.stages.contract.memory_fit import recompute_tokens_that_fit
    from qlora_pipeline.stages.lm.recompute import recompute_budget_of

    seen: list[object] = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: seen.append(d) or (2 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 2**30)
    params = parse_params(
        {"train": {"checkpoint_min_tokens": given, "compute_dtype": "bfloat16"}, "data": {"max_length": 1024}}
    )
    model = SimpleNamespace(config=SimpleNamespace(to_dict=lambda: SMOLLM2))
    budget = recompute_budget_of(model, params, torch.device(device))
    assert budget is not None
    shape, t = ModelShape.from_config(SMOLLM2), train_shape(params, SMOLLM2, device)
    if given == "auto" and device == "cuda":
        assert seen == [torch.device("cuda")]
        assert budget.tokens == recompute_tokens_that_fit(shape, t, 3 * 2**30) and 512 < budget.tokens < t.tokens
    else:
        assert seen == [] and budget.tokens == (512 if given == "auto" else given)
