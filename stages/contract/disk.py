"""How much disk a whole run writes, estimated from the base model's size before anything is written, so a run
that would fill the disk at export or release fails at prepare instead (preflight).

Bytes per parameter of each artifact (the formats' own sizes; embeddings and the head stay 16-bit in the 4-bit
formats, counted as if they were quantized, which the 1.25 margin covers): the prepared copy is the source's bytes;
NF4 with double-quantized scales ~4.13 bits; the merged model 2 or 4 bytes (merge.dtype); GGUF F16 2, Q8_0 1.0625,
Q4_0 0.5625, Q4_K_M ~0.61, Q5_K_M ~0.71; GPTQ 4-bit g64 ~0.56. The release copies merged, GGUF and GPTQ files into
a bundle, tars it (float data barely compresses) and publishes a copy: three times those.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from qlora_pipeline.stages.contract.params import Params

GGUF_BYTES_PER_PARAM = {"F16": 2.0, "Q8_0": 1.0625, "Q4_0": 0.5625, "Q4_K_M": 0.61, "Q5_K_M": 0.71}
NF4_BYTES_PER_PARAM = 4.13 / 8
GPTQ_BYTES_PER_PARAM = 0.56
MARGIN = 1.25


@dataclass(frozen=True)
class RunSize:
    """Estimated bytes a run writes, per stage."""

    per_stage: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.per_stage.values())


def estimate_run_bytes(params: Params, source_bytes: int, bytes_per_source_param: int) -> RunSize:
    """What prepare → release write for a base of ``source_bytes`` stored at ``bytes_per_source_param``."""
    n = source_bytes / bytes_per_source_param
    merged = n * (4 if params.merge.dtype == "float32" else 2)
    x = params.export
    exported = n * (sum(GGUF_BYTES_PER_PARAM[t] for t in x.gguf_types) + (GPTQ_BYTES_PER_PARAM if x.gptq else 0.0))
    per_stage = {
        "prepare": source_bytes,
        "quantize": n * NF4_BYTES_PER_PARAM,
        "merge": merged,
        "export": exported,
        "release": 3 * (merged + exported),
    }
    return RunSize({k: int(v * MARGIN) for k, v in per_stage.items()})


def stage_write_bytes(params: Params, stage: str) -> int | None:
    """About how much `stage` writes (the estimate prepare's disk check sums), from the prepared model when there is
    one, else the base model; None for stages it does not size (train's adapter and checkpoints are small)."""
    from qlora_pipeline.stages.contract.currency import artifacts_root
    from qlora_pipeline.stages.lm.modelio import base_model_dir

    prepared = artifacts_root(params) / "prepare" / "model"
    model_dir = prepared if prepared.is_dir() else base_model_dir(params.model)
    source = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) if model_dir.is_dir() else 0
    return estimate_run_bytes(params, source, 2).per_stage.get(stage) if source else None


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


__all__ = ["RunSize", "estimate_run_bytes", "free_bytes", "stage_write_bytes"]
