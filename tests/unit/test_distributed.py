"""train.nproc = 2 under torchrun on the CPU (gloo): data-parallel and FSDP2 training follow the single-process run,
FSDP2 holds half the NF4 bytes per rank, and a run whose rank is killed resumes from its checkpoints."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_pipeline.stages import prepare, quantize, train
from qlora_pipeline.stages.contract.errors import InputError, PipelineError
from qlora_pipeline.stages.contract.params import parse_params
from tests import tiny

BASE = {
    "lora_r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.0,  # dropout masks depend on which rank draws them
    "learning_rate": 5e-3,
    "warmup_ratio": 0.0,
    "batch_size": 4,
    "checkpoint_every": 2,
}
LOSS_TOLERANCE = 2e-3
"""Per-step loss, N ranks vs one process: the same examples and arithmetic, but each rank packs its own share
into rows of other shapes, so bf16 matmuls round differently (measured up to 1.3e-4)."""


def _params(tmp: Path, model_dir: Path, data: Path, **train_over: object):
    return parse_params(tiny.params_for(tmp, model_dir, data, train={**BASE, **train_over}, evaluate={"batch_size": 4}))


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    tmp = tmp_path_factory.mktemp("dist")
    model = tiny.make_model_dir(tmp / "model", "llama", hidden_size=128, intermediate_size=256)
    data = tiny.write_jsonl(tmp / "qa.jsonl", tiny.qa_rows(48))
    p = _params(tmp, model, data)
    prepare.run(p)
    quantize.run(p)
    return tmp, model, data


def _train(quantized, **over: object) -> tuple[list[float], dict[str, torch.Tensor], dict]:
    tmp = quantized[0]
    manifest = train.run(_params(*quantized, **over))
    out = tmp / "artifacts" / "train"
    log = json.loads((out / "train_log.json").read_text())
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    return [e["loss"] for e in log], adapter, manifest.metrics


@pytest.fixture(scope="module")
def single(quantized):
    return _train(quantized, max_steps=6, grad_accum=2)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_follow_the_single_process_run(quantized, single, mode: str) -> None:
    """Same losses step by step, the same adapter, the same PEFT folder; under FSDP2 each rank holds half the NF4
    codes and absmax, under ddp all of them."""
    losses_1, adapter_1, metrics_1 = single
    losses_2, adapter_2, metrics_2 = _train(quantized, max_steps=6, grad_accum=2, nproc=2, distributed=mode)
    assert len(losses_2) == len(losses_1) == 6
    gaps = [abs(a - b) for a, b in zip(losses_1, losses_2, strict=True)]
    print(f"{mode}: loss gap per step {[f'{g:.1e}' for g in gaps]}")
    assert max(gaps) < LOSS_TOLERANCE
    assert losses_2[-1] < losses_2[0] - 0.2, "it learns"
    assert adapter_2.keys() == adapter_1.keys()
    for k, v in adapter_1.items():
        rel = (adapter_2[k] - v).norm() / v.norm().clamp_min(1e-12)
        assert rel < 0.02, (k, float(rel))
    assert abs(metrics_2["val_loss_after"] - metrics_1["val_loss_after"]) < LOSS_TOLERANCE
    assert metrics_2["nproc"] == 2 and metrics_2["distributed"] == mode
    share = metrics_2["nf4_bytes_per_rank"] / metrics_1["nf4_bytes_per_rank"]
    print(f"{mode}: NF4 bytes per rank {metrics_2['nf4_bytes_per_rank']} vs {metrics_1['nf4_bytes_per_rank']}")
    assert share == 1.0 if mode == "ddp" else 0.5 <= share < 0.51


def _rank_pids(rank: int) -> list[int]:
    """Training processes torchrun started for this test run (found by their environment)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and any(e.startswith(b"QLORA_RANK_ERRORS=") for e in env):
            found.append(int(entry.name))
    return found


def test_a_killed_rank_resumes_from_the_checkpoint(quantized) -> None:
    """SIGKILL rank 1 once both ranks saved step 4: the run fails in one line, the next run resumes every rank
    from the newest step both saved and ends with exactly the adapter and losses of a run never killed."""
    tmp = quantized[0]
    over = {"max_steps": 24, "nproc": 2, "distributed": "fsdp"}
    ckpts = tmp / "artifacts" / ".checkpoints"
    killed: list[int] = []

    def kill_rank_1() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            if len(list(ckpts.glob("train-*/rank*/step-0000004"))) == 2:
                for pid in _rank_pids(1):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.02)

    killer = threading.Thread(target=kill_rank_1)
    killer.start()
    with pytest.raises(PipelineError, match="a rank was killed or crashed"):
        train.run(_params(*quantized, **over))
    killer.join()
    assert killed, "rank 1 was found and killed"
    saved = sorted(p.name for p in ckpts.glob("train-*/rank0/step-*"))
    assert saved and "step-0000024" not in saved
    manifest = train.run(_params(*quantized, **over))
    resumed = manifest.record["resumed_from_step"]
    assert resumed is not None and resumed >= 4
    losses = json.loads((tmp / "artifacts" / "train" / "train_log.json").read_text())
    adapter = load_file(str(tmp / "artifacts" / "train" / "adapter" / "adapter_model.safetensors"))
    assert not list(ckpts.glob("train-*")), "checkpoints removed after success"
    fresh_losses, fresh_adapter, _ = _train(quantized, **over)
    assert [e["loss"] for e in losses] == fresh_losses
    for k, v in fresh_adapter.items():
        assert torch.equal(adapter[k], v), k


def test_more_ranks_than_examples_per_batch_is_refused_at_prepare(quantized) -> None:
    with pytest.raises(InputError, match=r"train.batch_size=2 .* 4 processes"):
        prepare.run(_params(*quantized, batch_size=2, nproc=4))
