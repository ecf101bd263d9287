"""Peak host memory (RSS) of each stage, from config.json, the base model's shard sizes and the params (docs/memory.md).

Each stage costs a base (the imports and the run's own bookkeeping, measured with a ~1 MB model) plus what its code
holds at once for this model:

- prepare and release copy and hash files in small buffers: the base only;
- quantize buffers its NF4 output (one shard at most, and a whole 4-bit model is smaller than a 16-bit shard), the
  tensor it reads and the largest linear in fp32 while it quantizes it;
- train loads the NF4 model on the host before moving it to the device, and a paged optimizer keeps its state there;
  on the CPU the whole train step (`memory_plan.plan_train`, live tensor bytes) is host memory;
- merge buffers one output shard and serialises it (a second copy) while it writes;
- evaluate holds one 16-bit model at a time and one chunk of fp32 logits, log-softmax and probabilities;
- export holds the merged 16-bit model for scoring and a second copy while it writes and scores the GGUF and
  GPTQ files, and one chunk of logits.

Evaluate and export score in the compute dtype: on a CPU without bf16 arithmetic that is fp32, and the scored
model is twice its 16-bit size (kernels/dtypes.py).

`bench/bench_host_memory.py` compares these with the peak RSS each stage's manifest records.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qlora_pipeline.stages.contract.memory_plan import BYTES_PER_LOGIT, LOSS_CHUNK, ModelShape, TrainShape, plan_train

STAGE_BASE_MIB = {
    "prepare": 545,
    "quantize": 469,
    "train": 645,
    "merge": 242,
    "evaluate": 587,
    "export": 586,
    "release": 545,
}
"""Peak RSS of each stage with a 2-layer, 64-wide model (`bench/bench_host_memory.py`, size "tiny"): the imports and
the stage's own work. Measured on the 2-core dev VM (torch 2.13 CPU build), except release, taken as prepare's (it
measured 424-479 MiB: the figure errs high). A CUDA build of torch adds its libraries to every stage that imports
it, an amount not measured here."""
HUB_SHARD_BYTES = 5 * 10**9
"""The largest shard assumed when only config.json is known (the hub's usual 5 GB shards)."""


@dataclass(frozen=True)
class ModelFiles:
    """Sizes of the base model's weights on disk."""

    weights_16bit: int
    largest_shard: int
    largest_tensor: int
    """16-bit bytes of the largest single tensor (the embeddings or the head, or a linear)."""
    largest_linear: int
    """16-bit bytes of the largest decoder linear (the tensors quantize and merge compute on in fp32)."""

    @classmethod
    def estimate(cls, shape: ModelShape, model_dir: Path | None = None) -> ModelFiles:
        """From the shape (16-bit weights); the largest shard from the folder's safetensors files when given."""
        linear = max(out * in_ for out, in_ in shape.linears.values())
        head = shape.vocab * shape.hidden
        weights = 2 * (
            shape.layers * sum(out * in_ for out, in_ in shape.linears.values())
            + head * (1 if shape.tied else 2)
            + (2 * shape.layers + 1) * shape.hidden
        )
        files = sorted(model_dir.glob("*.safetensors")) if model_dir is not None else []
        shard = max((f.stat().st_size for f in files), default=min(weights, HUB_SHARD_BYTES))
        return cls(weights, shard, 2 * max(head, linear), 2 * linear)


def host_peaks(shape: ModelShape, t: TrainShape, files: ModelFiles, device_type: str) -> dict[str, int]:
    """Predicted peak RSS of each stage in bytes, on a node computing on `device_type` ('cuda' or 'cpu')."""
    train_plan = plan_train(shape, replace(t, ranks=1, sharded=False, reference_dequant=device_type == "cpu"))
    nf4_model = train_plan.base_nf4 + train_plan.base_16bit
    logits_chunk = BYTES_PER_LOGIT * LOSS_CHUNK * shape.vocab
    scored = files.weights_16bit * t.compute_bytes // 2  # the model evaluate and export score, in the compute dtype
    if device_type == "cpu":
        train = train_plan.device_peak + train_plan.host_optimizer
    else:
        train = nf4_model + train_plan.host_optimizer
    extra = {
        "prepare": 0,
        "quantize": min(files.largest_shard, nf4_model) + files.largest_tensor + 3 * files.largest_linear,
        "train": train,
        "merge": 2 * files.largest_shard + 2 * files.largest_linear,
        "evaluate": scored + logits_chunk,
        "export": 2 * scored + logits_chunk,
        "release": 0,
    }
    return {stage: STAGE_BASE_MIB[stage] * 2**20 + more for stage, more in extra.items()}


def host_plan(params: Any, config: dict[str, Any], model_dir: Path | None, device_type: str) -> dict[str, int]:
    """host_peaks for the base model of `config` (its shards read from `model_dir` when given) under `params`."""
    from qlora_pipeline.stages.contract.memory_plan import train_shape

    shape = ModelShape.from_config(config)
    files = ModelFiles.estimate(shape, model_dir)
    return host_peaks(shape, train_shape(params, config, device_type), files, device_type)
