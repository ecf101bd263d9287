"""The pipeline's stages, their parents, params sections and code deps: the single source that dvc.yaml,
the Prefect cache keys and the CLI agree on (a test checks dvc.yaml against it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    name: str
    parents: tuple[str, ...]
    params: tuple[str, ...]
    code: tuple[str, ...]
    """Source paths (relative to the repo root) whose change must re-run the stage."""
    uses_device: bool = False
    """Computes on `runtime.device` (the others run on the CPU by design: quantize's bytes are defined by CPU
    arithmetic, merge is one fp32 matmul per layer, prepare and release only move bytes)."""


COMMON_CODE = ("stages/common",)

STAGES: dict[str, StageSpec] = {
    "prepare": StageSpec("prepare", (), ("model", "data"), ("stages/prepare.py", *COMMON_CODE)),
    "quantize": StageSpec(
        "quantize",
        ("prepare",),
        ("quantize",),
        (
            "stages/quantize.py",
            *COMMON_CODE,
            "kernels/nf4.py",
            "kernels/dynamic_map.py",
            "kernels/bnb_format.py",
            "kernels/checkpoint4bit.py",
            "kernels/linear4bit.py",
        ),
    ),
    "train": StageSpec(
        "train",
        ("prepare", "quantize"),
        ("runtime", "train", "evaluate"),
        ("stages/train.py", *COMMON_CODE, "kernels"),
        uses_device=True,
    ),
    "merge": StageSpec(
        "merge",
        ("prepare", "train"),
        ("merge",),
        ("stages/merge.py", *COMMON_CODE, "kernels/peft_format.py", "kernels/lora.py"),
    ),
    "evaluate": StageSpec(
        "evaluate",
        ("prepare", "quantize", "train", "merge"),
        ("runtime", "evaluate"),
        ("stages/evaluate.py", *COMMON_CODE, "kernels"),
        uses_device=True,
    ),
    "export": StageSpec(
        "export",
        ("prepare", "merge"),
        ("runtime", "export", "evaluate"),
        (
            "stages/export.py",
            *COMMON_CODE,
            "kernels/fused_ce.py",  # the held-out loss (stages/common/lm_loss.py) runs through these two
            "kernels/lora.py",
            "kernels/gguf_export.py",
            "kernels/kquants.py",
            "kernels/gptq.py",
            "kernels/gptq_format.py",
            "kernels/gptq_model.py",
        ),
        uses_device=True,
    ),
    "release": StageSpec(
        "release",
        ("prepare", "quantize", "train", "merge", "evaluate", "export"),
        ("release",),
        ("stages/release.py", *COMMON_CODE),
    ),
}

ORDER: tuple[str, ...] = tuple(STAGES)
