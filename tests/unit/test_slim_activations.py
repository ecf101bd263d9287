"""Norms and gated MLPs that keep only their inputs for backward: the same values and gradients as transformers'
own modules, bit for bit, on every family the pipeline trains, and fewer bytes kept."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from qlora_pipeline.kernels.lora import inject_lora
from qlora_pipeline.kernels.slim_activations import saved_tensor_bytes, slim_saved_activations
from tests import tiny

PATCHED = {  # (RMSNorms, gated MLPs) a 2-layer tiny model of the family gets
    "llama": (5, 2),
    "qwen2": (5, 2),
    "qwen3": (9, 2),  # + q_norm and k_norm per layer
    "mistral": (5, 2),
    "phi3": (5, 0),  # one gate_up_proj: its own MLP form, left as is
    "gemma2": (0, 2),  # Gemma's (1 + w) norm: left as is
    "gemma3": (0, 2),
}


@pytest.mark.parametrize("arch", sorted(PATCHED))
def test_slim_model_trains_exactly_as_the_plain_one(arch: str) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(tiny.tiny_config(arch, vocab_size=384)).to(torch.bfloat16)
    targets = ["o_proj", "down_proj"] + (["qkv_proj", "gate_up_proj"] if arch == "phi3" else ["q_proj", "up_proj"])
    inject_lora(plain, targets, r=4, alpha=8, dropout=0.1, compute_dtype=torch.bfloat16)
    for name, p in plain.named_parameters():
        if name.endswith("lora_B"):
            torch.nn.init.normal_(p, std=0.05)
    slim = copy.deepcopy(plain)
    counts = slim_saved_activations(slim)
    assert (counts["rmsnorm"], counts["gated_mlp"]) == PATCHED[arch]
    ids = torch.randint(3, 384, (2, 24), generator=torch.Generator().manual_seed(1))
    losses, grads, kept = [], [], []
    for model in (plain, slim):
        model.train()
        torch.manual_seed(7)  # the same dropout masks
        kept.append(saved_tensor_bytes(lambda m=model: losses.append(m(ids, labels=ids, use_cache=False).loss)))
        losses[-1].backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert torch.equal(losses[0], losses[1])
    for name, g in grads[0].items():
        assert torch.equal(grads[1][name], g), name
    assert any(g.abs().sum() > 0 for g in grads[0].values())
    if sum(PATCHED[arch]):
        assert kept[1] < kept[0]  # what the recompute frees


def test_slim_saves_a_norm_and_a_gated_mlp_what_the_docstring_says() -> None:
    """One Llama layer's saved bytes drop by the fp32 norm inputs' extra half and one FFN-wide 16-bit tensor."""
    from transformers import AutoModelForCausalLM

    cfg = tiny.tiny_config("llama", vocab_size=384, num_hidden_layers=1)
    plain = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    inject_lora(plain, ["q_proj"], r=4, alpha=8, dropout=0.0, compute_dtype=torch.bfloat16)
    slim = copy.deepcopy(plain)
    slim_saved_activations(slim)
    ids = torch.randint(3, 384, (2, 32), generator=torch.Generator().manual_seed(1))
    plain.train(), slim.train()
    kept = [saved_tensor_bytes(lambda m=m: m(ids, use_cache=False)) for m in (plain, slim)]
    tokens, hidden, ffn = 64, cfg.hidden_size, cfg.intermediate_size
    # two norms on the gradient's path (the first sees the frozen embedding's output): their fp32 input (4 B an
    # element), fp32 rstd (one a token) and weight give way to the 16-bit input; the MLP keeps gate and up, not act
    assert kept[0] - kept[1] == 2 * (tokens * hidden * 2 + tokens * 4 + hidden * 2) + tokens * ffn * 2


def test_lora_branches_keep_what_the_memory_plan_counts() -> None:
    """On an NF4 layer (whose frozen base keeps nothing), LoRA on all seven projections with dropout keeps, beyond
    LoRA on q alone, exactly what memory_plan counts: each shared input once (q/k/v and gate/up read one tensor
    each; o_proj's is the attention output, kept anyway) and per projection the r-wide product (on a CPU the
    dropout mask is rebuilt from its seed in backward, not kept); plus the 16-bit casts of A and B."""
    from transformers import AutoModelForCausalLM

    from qlora_pipeline.kernels.architectures import LINEAR_SETS
    from qlora_pipeline.kernels.linear4bit import quantize_model_linears
    from qlora_pipeline.stages.contract.memory_plan import lora_bytes

    cfg = tiny.tiny_config("llama", vocab_size=384, num_hidden_layers=1)
    ids = torch.randint(3, 384, (2, 32), generator=torch.Generator().manual_seed(1))
    every = [name.rpartition(".")[2] for group in LINEAR_SETS for name in group]
    kept = []
    for targets in (["q_proj"], every):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
        quantize_model_linears(model, lambda name: ".layers." in name, compute_dtype=torch.bfloat16)
        inject_lora(model, targets, r=4, alpha=8, dropout=0.1, compute_dtype=torch.bfloat16)
        slim_saved_activations(model)
        model.train()
        kept.append(saved_tensor_bytes(lambda m=model: m(ids, use_cache=False)))
    h, ffn = cfg.hidden_size, cfg.intermediate_size
    t = SimpleNamespace(compute_bytes=2, lora_r=4)  # no masks kept: backward rebuilds them from their seeds
    every_groups, q_alone = [[h, h, h], [h], [h, h], [ffn]], [[h]]
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    a_b = 4 * (6 * h + ffn) + 4 * (3 * h + 2 * kv + 2 * ffn)  # A (r x in) and B (out x r) of the seven, 16-bit
    casts = 2 * a_b - 2 * 4 * (h + h)
    o_input = 2 * h  # the attention output: what o_proj's branch reads, kept with LoRA on q alone too
    per_token = lora_bytes(t, every_groups) - o_input - lora_bytes(t, q_alone)
    assert kept[1] - kept[0] == 64 * per_token + casts


@pytest.mark.parametrize("arch", sorted(PATCHED))
def test_which_families_back_up_by_hand(arch: str) -> None:
    """The hand-written backward (not the recompute under autograd) serves every Llama-style norm whose whole forward
    is the known one and every SiLU-gated MLP: the exactness test above covers both paths through these families."""
    from transformers import AutoModelForCausalLM

    from qlora_pipeline.kernels import slim_activations as sa

    model = AutoModelForCausalLM.from_config(tiny.tiny_config(arch, vocab_size=384))
    norms = {type(m) for m in model.modules() if sa._has_form(type(m), sa.RMSNORM_FORM)}
    mlps = [m for m in model.modules() if sa._has_form(type(m), sa.GATED_MLP_FORM)]
    by_hand_norm = {"llama", "qwen2", "qwen3", "mistral", "phi3"}
    assert (bool(norms) and all(sa._has_whole_norm_form(cls) for cls in norms)) == (arch in by_hand_norm)
    assert all(sa._is_plain_silu(m.act_fn) for m in mlps) == (arch not in {"gemma2", "gemma3"})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_backward_by_hand_is_the_recompute_bit_for_bit(dtype: torch.dtype, monkeypatch) -> None:
    """The hand-written norm and SiLU-product backward give the recompute-under-autograd's loss and gradients
    exactly, in bf16 and in fp32 (where a CPU without bf16 dot products trains). In fp32 neither equals the unpatched
    model bit for bit: there the norm's input is its fp32 input itself, so the unpatched graph adds the norm's two
    gradient terms and the residual's in another order."""
    from transformers import AutoModelForCausalLM

    from qlora_pipeline.kernels import slim_activations as sa

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny.tiny_config("llama", vocab_size=384)).to(dtype)
    inject_lora(base, ["q_proj", "o_proj", "up_proj", "down_proj"], r=4, alpha=8, dropout=0.1, compute_dtype=dtype)
    for name, p in base.named_parameters():
        if name.endswith("lora_B"):
            torch.nn.init.normal_(p, std=0.05)
    ids = torch.randint(3, 384, (2, 24), generator=torch.Generator().manual_seed(1))
    runs = []
    for by_hand in (False, True):
        model = copy.deepcopy(base)
        slim_saved_activations(model)
        model.train()
        if not by_hand:
            monkeypatch.setattr(sa, "_has_whole_norm_form", lambda cls: False)
            monkeypatch.setattr(sa, "_is_plain_silu", lambda act: False)
        torch.manual_seed(7)
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        monkeypatch.undo()
        runs.append((loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert torch.equal(runs[0][0], runs[1][0])
    for name, g in runs[0][1].items():
        assert torch.equal(runs[1][1][name], g), name
    assert all(g.abs().sum() > 0 for g in runs[0][1].values())
