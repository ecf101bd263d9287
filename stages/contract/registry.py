"""The pipeline's stages: parents, the params fields each reads, whether it computes on `runtime.device`.

The single source that dvc.yaml (`pipelines/dvcgen.py`; a test checks the committed file), the Prefect cache keys,
the flow's currency check and the CLI agree on. Code dependencies are not listed by hand: they are derived from
each stage module's imports (`codedeps.py`). `load_stage` is the one place a stage name becomes code.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlora_pipeline.stages.contract.codedeps import code_files

if TYPE_CHECKING:
    from qlora_pipeline.stages.contract.artifacts import Manifest
    from qlora_pipeline.stages.contract.params import Params


@dataclass(frozen=True)
class StageSpec:
    name: str
    parents: tuple[str, ...]
    params: tuple[str, ...]
    """The params.yaml fields the stage reads: a whole section (`train`) or one field (`evaluate.batch_size`).
    The stage's body sees only these (`DeclaredParams`), so the list cannot fall behind the code."""
    uses_device: bool = False
    """Computes on `runtime.device` (the others run on the CPU by design: quantize's bytes are defined by CPU
    arithmetic, merge is one fp32 matmul per layer, prepare and release only move bytes)."""

    @property
    def module(self) -> str:
        return f"qlora_pipeline.stages.{self.name}"

    def code(self) -> tuple[str, ...]:
        """Source files whose change must re-run the stage: its module and everything it imports from ours."""
        return code_files(self.module)

    def param_values(self, params: Params) -> dict[str, Any]:
        """The declared params as a nested mapping (`{"evaluate": {"batch_size": 8}}`), JSON-ready."""
        out: dict[str, Any] = {}
        for entry in self.params:
            section, _, field = entry.partition(".")
            values = params.section(section)
            if field:
                out.setdefault(section, {})[field] = values[field]
            else:
                out[section] = values
        return out


STAGES: dict[str, StageSpec] = {
    s.name: s
    for s in (
        StageSpec("prepare", (), ("model", "data")),
        StageSpec(
            "quantize",
            ("prepare",),
            ("quantize", "train.lora_r", "train.lora_alpha", "train.use_rslora", "train.target_modules"),
        ),
        StageSpec(
            "train",
            ("prepare", "quantize"),
            ("runtime.device", "train", "evaluate.batch_size", "data.max_length"),
            uses_device=True,
        ),
        StageSpec("merge", ("prepare", "quantize", "train"), ("merge",)),
        StageSpec(
            "evaluate",
            ("prepare", "quantize", "train", "merge"),
            ("runtime.device", "evaluate", "data.system_prompt"),
            uses_device=True,
        ),
        StageSpec(
            "export", ("prepare", "merge"), ("runtime.device", "export", "evaluate.batch_size"), uses_device=True
        ),
        StageSpec(
            "release",
            ("prepare", "quantize", "train", "merge", "evaluate", "export"),
            (
                "model.source",
                "model.path",
                "data.source",
                "data.path",
                "data.system_prompt",
                "train",
                "quantize.blocksize",
                "merge.dtype",
                "release",
            ),
        ),
    )
}

ORDER: tuple[str, ...] = tuple(STAGES)


@dataclass(frozen=True)
class Stage:
    """A stage as the flow, the CLI and DVC call it."""

    spec: StageSpec
    run: Callable[..., Manifest]
    """`run(params, parent_run_id=None) -> Manifest`: the whole stage through the contract (`stage.execute`)."""
    external_inputs: Callable[[Params], dict[str, str]]
    """What the stage reads from outside the artifact tree (prepare: the dataset bytes); part of its cache key."""
    check_base_model: Callable[[Path, Params], None] | None = None
    """The stage's demands on the base model, checked at prepare from its config and tokenizer (export: GGUF and
    GPTQ can write it). Called through the registry, so it is not part of prepare's code (a check, not an input)."""


def _no_external_inputs(params: Params) -> dict[str, str]:
    return {}


def load_stage(name: str) -> Stage:
    """The stage called `name`; an unknown name is a KeyError (callers check against ORDER first)."""
    spec = STAGES[name]
    module = importlib.import_module(spec.module)
    return Stage(
        spec,
        module.run,
        getattr(module, "external_inputs", _no_external_inputs),
        getattr(module, "check_base_model", None),
    )
