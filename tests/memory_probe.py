"""A train step's measured peak (live torch tensor bytes, on the CPU) beside its memory plan, for tiny models of any
family: the check of stages/contract/memory_plan.py (tests/unit/test_memory_plan.py, bench/bench_memory_plan.py)."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qlora_pipeline.stages.contract.memory_plan import (
    MemoryPlan,
    ModelShape,
    TrainShape,
    plan_train,
    weight_cache_budget,
)
from qlora_pipeline.stages.contract.memory_track import AllocationTracker
from tests import tiny


@dataclass(frozen=True)
class Probe:
    arch: str
    sizes: dict[str, int]
    batch: int
    seq: int
    checkpointing: bool
    optimizer: str = "adamw_32bit"
    r: int = 16
    recompute_tokens: int = 0
    """With checkpointing: train.checkpoint_min_tokens (0: every layer recomputes)."""

    @property
    def label(self) -> str:
        s = self.sizes
        ckpt = "no ckpt"
        if self.checkpointing:
            ckpt = f"ckpt over {self.recompute_tokens}" if self.recompute_tokens else "ckpt"
        return (
            f"{self.arch} L{s['num_hidden_layers']} H{s['hidden_size']} V{s['vocab_size']}, {self.batch}x{self.seq}, "
            f"{ckpt}, {self.optimizer}, r{self.r}"
        )


def sizes(**over: int) -> dict[str, int]:
    base = {
        "vocab_size": 2048,
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 3,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
    }
    return base | over


def measure(probe: Probe, steps: int = 2) -> tuple[int, MemoryPlan]:
    """(peak bytes of the last of `steps` train steps, the plan) on the CPU in bf16 compute, as train runs it."""
    from transformers import AutoModelForCausalLM

    from qlora_pipeline.kernels.formats.bnb_loader import save_4bit_checkpoint
    from qlora_pipeline.stages.contract.cpu_kernels import expected_in_use
    from qlora_pipeline.stages.contract.memory_plan import recompute_budget
    from qlora_pipeline.stages.contract.params import TrainParams
    from qlora_pipeline.stages.lm.batching import collate
    from qlora_pipeline.stages.lm.lm_loss import summed_loss
    from qlora_pipeline.stages.lm.recompute import set_recomputed_layers
    from qlora_pipeline.stages.train import build_model, make_optimizer

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        cfg = tiny.tiny_config(probe.arch, **probe.sizes)
        AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(Path(tmp) / "bf16")
        save_4bit_checkpoint(Path(tmp) / "bf16", Path(tmp) / "nf4", blocksize=64, compute_dtype="bfloat16")
        config: dict[str, Any] = json.loads((Path(tmp) / "bf16" / "config.json").read_text())
        t = TrainParams(
            optimizer=probe.optimizer,
            lora_r=probe.r,
            lora_alpha=2 * probe.r,
            lora_dropout=0.05,
            compute_dtype="bfloat16",
        )
        model, trainable = build_model(Path(tmp) / "nf4", t, torch.device("cpu"), torch.bfloat16)
    shape = ModelShape.from_config(config)
    shape_t = TrainShape(
        batch_size=probe.batch,
        max_length=probe.seq,
        lora_r=probe.r,
        targets=shape.family.lora_targets,
        checkpointing=probe.checkpointing,
        adapter_bytes=4,
        compute_bytes=2,
        state_bits=8 if "8bit" in probe.optimizer else 32,
        page_budget_bytes=None,
        reference_dequant=True,
        short_attention=True,
        weight_cache_bytes=weight_cache_budget(t, "cpu"),
        recompute_budget_tokens=probe.recompute_tokens,
        compiled_update="8bit" in probe.optimizer and expected_in_use(),  # as train_shape_of decides it
    )
    model.train()
    recomputed = recompute_budget(shape, shape_t).recomputed_layers(probe.batch * probe.seq)
    set_recomputed_layers(model, recomputed if probe.checkpointing else 0)
    opt = make_optimizer(trainable, t)
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, probe.sizes["vocab_size"], (probe.seq,), generator=g).tolist() for _ in range(probe.batch)]
    batch = collate([(x, x) for x in ids], pad_id=0)  # every token labelled: the most the loss can take
    tracker = AllocationTracker("cpu")
    tracker.track(model, opt)
    with tracker:
        for _ in range(steps):
            tracker.peak = tracker.current
            total, n = summed_loss(model, batch)
            (total / n).backward()
            torch.nn.utils.clip_grad_norm_(trainable, 0.3)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return tracker.peak, plan_train(shape, shape_t)


PROBES = [
    Probe("llama", sizes(vocab_size=384, num_hidden_layers=4), 4, 128, True),
    Probe("llama", sizes(vocab_size=384, num_hidden_layers=4), 4, 128, False),
    Probe("llama", sizes(vocab_size=8192, num_hidden_layers=2), 8, 128, True),
    Probe("llama", sizes(vocab_size=8192, num_hidden_layers=2), 8, 128, False),
    Probe("llama", sizes(), 4, 256, True),
    Probe("llama", sizes(vocab_size=4096), 2, 256, True, "adamw_32bit", 64),
    Probe("qwen3", sizes(), 4, 256, True),
    Probe("phi3", sizes(num_key_value_heads=8), 4, 128, False),
    Probe(
        "mistral",
        sizes(hidden_size=384, intermediate_size=1024, num_attention_heads=6, num_key_value_heads=2),
        2,
        256,
        True,
        "adamw_8bit",
    ),
    Probe("gemma2", sizes(num_hidden_layers=2), 2, 128, True),
    Probe("gemma3", sizes(num_hidden_layers=2), 2, 128, False),
    Probe("llama", sizes(vocab_size=384, num_hidden_layers=4), 4, 128, True, recompute_tokens=320),
]
"""Six families, with and without checkpointing (every layer recomputed, or as many as a 320-token budget needs),
32- and 8-bit state, r 16 and 64, vocabularies 384 to 8192."""
