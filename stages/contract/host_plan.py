"""Peak host memory (RSS) of each stage, from config.json, the base model's shard sizes and the params (docs/memory.md).

First-order terms: what each stage holds at once by the design of its code, on top of the imports.

- prepare copies and hashes the model file by file in small buffers and tokenizes the data: the imports only;
- quantize reads one tensor at a time (bf16, then fp32 for quantization) and buffers one output shard, no larger
  than the source's largest shard (docs/architecture.md, "Memory on one host");
- train loads the NF4 model on the host before moving it to the device; a paged optimizer keeps its state in host
  memory; on the CPU the whole train step (`memory_plan.plan_train`) is host memory;
- merge reads one base shard and writes one merged shard, a tensor at a time in fp32;
- evaluate and export load a whole 16-bit model with transformers (on the host, then to the device), one at a time.

`bench/bench_memory_plan.py` compares these with the peak RSS each stage's manifest records.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qlora_pipeline.stages.contract.memory_plan import ModelShape, TrainShape, plan_train

IMPORTS_BYTES = 512 * 2**20
"""Python, torch, transformers and datasets once imported (measured 0.40-0.47 GB on the dev VM; an assumption
elsewhere)."""
HUB_SHARD_BYTES = 5 * 10**9
"""The largest shard assumed when only config.json is known (the hub's usual 5 GB shards)."""


@dataclass(frozen=True)
class ModelFiles:
    """Sizes of the base model's weights on disk."""

    weights_16bit: int
    largest_shard: int
    largest_tensor: int
    """16-bit bytes of the largest single tensor (the embeddings or the head)."""

    @classmethod
    def estimate(cls, shape: ModelShape, model_dir: Path | None = None) -> ModelFiles:
        """From the shape (16-bit weights); the largest shard from the folder's safetensors files when given."""
        linear = shape.layers * sum(out * in_ for out, in_ in shape.linears.values())
        head = shape.vocab * shape.hidden * (1 if shape.tied else 2)
        weights = 2 * (linear + head + (2 * shape.layers + 1) * shape.hidden)
        files = sorted(model_dir.glob("*.safetensors")) if model_dir is not None else []
        shard = max((f.stat().st_size for f in files), default=min(weights, HUB_SHARD_BYTES))
        return cls(weights, shard, 2 * shape.vocab * shape.hidden)


def host_peaks(shape: ModelShape, t: TrainShape, files: ModelFiles, device_type: str) -> dict[str, int]:
    """Predicted peak RSS of each stage in bytes, on a node computing on `device_type` ('cuda' or 'cpu')."""
    train_plan = plan_train(shape, replace(t, ranks=1, sharded=False, reference_dequant=device_type == "cpu"))
    nf4_model = train_plan.base_nf4 + train_plan.base_16bit
    tensor_fp32 = 2 * files.largest_tensor
    if device_type == "cpu":
        train = train_plan.device_peak + train_plan.host_optimizer
    else:
        train = max(nf4_model, train_plan.host_optimizer)
    peaks = {
        "prepare": 0,
        "quantize": min(files.largest_shard, nf4_model) + files.largest_tensor + tensor_fp32,
        "train": train,
        "merge": 2 * files.largest_shard + tensor_fp32,
        "evaluate": files.weights_16bit,
        "export": files.weights_16bit + tensor_fp32,
        "release": 0,
    }
    return {stage: IMPORTS_BYTES + extra for stage, extra in peaks.items()}


def host_plan(params: Any, config: dict[str, Any], model_dir: Path | None, device_type: str) -> dict[str, int]:
    """host_peaks for the base model of `config` (its shards read from `model_dir` when given) under `params`."""
    from qlora_pipeline.stages.contract.memory_plan import train_shape

    shape = ModelShape.from_config(config)
    return host_peaks(
        shape, train_shape(params, config, device_type), ModelFiles.estimate(shape, model_dir), device_type
    )
