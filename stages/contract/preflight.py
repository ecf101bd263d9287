"""Checks that run before a stage does any work, so a run that would fail late fails at its start.

- `runtime.device` must name a device torch can use (every stage checks it, so `prepare` already refuses a
  run that `train` could not do);
- `prepare` checks that export can write the base model's family, rope scaling and tokenizer, and that GPTQ's group
  size fits its linears, from config.json and tokenizer.json alone, so a run that would fail at export fails in
  seconds, before training;
- `prepare` checks that the disk holding the artifacts has room for everything the run writes
  (`stages/contract/disk.py`), on a GPU that a train step fits its memory (`stages/contract/memory_plan.py`),
  and that each of train.nproc processes gets an example of every batch;
- with `export.score_gguf` on, `prepare` checks that the GGUF reader is installed and has loaded a model on this
  machine (a smoke load in a child process, remembered per reader build and CPU), so a reader that crashes on
  this CPU stops the run at `prepare`, not after training; `export` checks that it is installed (its own reads
  are isolated anyway).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from qlora_pipeline.kernels.formats.atomic import atomic_file
from qlora_pipeline.stages.contract.device import check_nproc, resolve_device, resolve_nproc
from qlora_pipeline.stages.contract.errors import InputError, PipelineError
from qlora_pipeline.stages.contract.native_probe import native_build_key
from qlora_pipeline.stages.contract.params import Params


def preflight(params: Params, stage: str, uses_device: bool) -> str:
    """Run the checks for `stage`; return the device it computes on ('cpu' for stages that never use another)."""
    device = str(resolve_device(params.runtime.device))
    if params.export.score_gguf and stage in ("prepare", "export"):
        check_reader(smoke=stage == "prepare")
    if stage == "prepare":
        check_base_model(params)
        check_nproc(params)
        if params.release.signing_key is not None:  # a run that cannot sign its release fails now, not at the end
            from qlora_pipeline.stages.contract.signing import signing_key_path

            signing_key_path(params.release)
        if device.startswith("cuda"):
            check_gpu_memory(params, device)
    return device if uses_device else "cpu"


def check_gpu_memory(params: Params, device: str) -> None:
    """A train step of the base model under these params fits the GPU (silent when config.json is not readable:
    prepare reports that itself)."""
    import torch

    from qlora_pipeline.stages.contract.memory_fit import check_train_memory
    from qlora_pipeline.stages.lm.modelio import base_model_dir

    path = base_model_dir(params.model) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    capacity = torch.cuda.get_device_properties(torch.device(device)).total_memory
    try:
        check_train_memory(params, config, capacity, device, ranks=resolve_nproc(params))
    except ValueError:
        return  # a family the planner does not know is prepare's own error


def check_base_model(params: Params) -> None:
    """The later stages' demands on the base model, checked from its config and tokenizer before prepare copies it
    (export: GGUF architecture, rope scaling and tokenizer; GPTQ shapes)."""
    from qlora_pipeline.stages.contract.registry import ORDER, load_stage
    from qlora_pipeline.stages.lm.modelio import base_model_dir

    model_dir = base_model_dir(params.model)
    for name in ORDER:
        check = load_stage(name).check_base_model
        if check is not None:
            check(model_dir, params)
    check_disk(params, model_dir)


def check_disk(params: Params, model_dir: Path) -> None:
    """The whole run's artifacts fit on the disk that holds them (stages.contract.disk estimates them from the base
    model's size); silent when the folder has no weights yet, which prepare itself reports."""
    import torch

    from qlora_pipeline.kernels.dtypes import config_dtype
    from qlora_pipeline.stages.contract.currency import artifacts_root
    from qlora_pipeline.stages.contract.disk import estimate_run_bytes, free_bytes

    source = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) if model_dir.is_dir() else 0
    if not source or not (model_dir / "config.json").is_file():
        return
    try:  # 16-bit unless the config says otherwise: the larger parameter count, the safer estimate
        per_param = config_dtype(json.loads((model_dir / "config.json").read_text()), torch.bfloat16).itemsize
    except ValueError:
        return  # an unreadable config.json is prepare's own error
    size = estimate_run_bytes(params, source, per_param)
    root = artifacts_root(params)
    free = free_bytes(root)
    if size.total > free:
        gib = 2**30
        parts = ", ".join(f"{k} {v / gib:.1f}" for k, v in size.per_stage.items())
        raise InputError(
            f"this run writes about {size.total / gib:.1f} GiB under {root} ({parts} GiB, from a "
            f"{source / gib:.1f} GiB base) but {free / gib:.1f} GiB are free there; free space, set "
            "tracking.artifacts_dir to a larger disk, or export fewer formats (export.gguf_types, export.gptq)"
        )


def preflight_run(params: Params, stages: list[str]) -> None:
    """`qlora run`: the checks of every stage about to run, before Prefect starts."""
    for stage in stages:
        preflight(params, stage, uses_device=False)


def _reader_build_key() -> str | None:
    """Hash of the installed llama.cpp libraries and this CPU's flags; None when llama-cpp-python is absent."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
    return native_build_key(sorted(lib.glob("*.so")))


def check_reader(smoke: bool = True) -> None:
    """The GGUF reader is installed and (`smoke`) was seen loading a model on this CPU, once per build and CPU."""
    from qlora_pipeline.stages.lm.llama_reader import smoke_check
    from qlora_pipeline.stages.lm.modelio import cache_dir, embedded_gguf_path

    key = _reader_build_key()
    if key is None:
        raise InputError(
            "export.score_gguf is true but the GGUF reader llama-cpp-python is not installed; run `make reader` "
            "(builds it for this CPU) or set export.score_gguf: false"
        )
    stamp = cache_dir() / "reader-checks" / f"{key}.json"
    if not smoke or stamp.exists():
        return
    try:
        gguf = embedded_gguf_path()
    except PipelineError:
        return  # nothing to load without the embedded model; export still isolates every read
    info = smoke_check(gguf)
    with atomic_file(stamp) as partial:  # whole or absent, for another run checking at the same moment
        partial.write_text(json.dumps(info))
