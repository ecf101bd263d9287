"""Every computing stage honours `runtime.device`, checked without a GPU on the simulated device of tests/simdevice.py.

On `sim`, a tensor left on the CPU next to a model on the device raises the error CUDA raises, and every host sync
is logged with the line that caused it. The negative control shows the harness catches the bug a GPU node met
first (batches collated on the CPU and fed to a model on the GPU).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from qlora_pipeline.stages import evaluate, export, merge, prepare, quantize, train
from qlora_pipeline.stages.contract.artifacts import read_manifest
from qlora_pipeline.stages.contract.errors import InputError
from qlora_pipeline.stages.contract.params import parse_params
from qlora_pipeline.stages.lm.batching import collate, eval_batches
from qlora_pipeline.stages.lm.lm_loss import summed_loss
from tests import tiny
from tests.simdevice import simulated_device

TRAIN = {"batch_size": 4, "lora_r": 4, "lora_alpha": 8, "learning_rate": 5e-3, "checkpoint_min_tokens": 0}


def _params(tmp: Path, model: Path, data: Path, device: str, **train_overrides: Any):
    raw = tiny.params_for(
        tmp,
        model,
        data,
        train={**TRAIN, "max_steps": 4, **train_overrides},
        evaluate={"batch_size": 4, "num_generations": 2, "max_new_tokens": 4},
        export={"gguf_types": ["F16"], "gptq_calibration_samples": 4},
    )
    raw["runtime"] = {"device": device}
    return parse_params(raw)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("device")
    return tiny.make_model_dir(tmp / "base", "llama"), tiny.write_jsonl(tmp / "data" / "pairs.jsonl", tiny.qa_rows(40))


def _heldout_loss_as_it_was(model: Any, rows: list, batch_size: int, pad_id: int) -> float:
    """The pre-fix held-out loss: batches collated on the CPU, handed as they are to the model (negative control)."""
    total, count = 0.0, 0
    for idx in eval_batches([len(r[0]) for r in rows], batch_size):
        s, n = summed_loss(model, collate([rows[i] for i in idx], pad_id))
        total, count = total + float(s), count + n
    return total / count


def test_the_simulated_device_catches_a_cpu_batch_fed_to_a_device_model(assets) -> None:
    from transformers import AutoModelForCausalLM

    from qlora_pipeline.stages.lm.lm_loss import heldout_loss

    model_dir, _ = assets
    rows = [([1, 5, 6, 7, 8, 2], [-100, -100, 6, 7, 8, 2]), ([1, 9, 10, 2], [-100, -100, 10, 2])]
    cpu_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    expected = heldout_loss(cpu_model, rows, 2, 0)["loss"]
    with simulated_device():
        model = cpu_model.to("sim")
        with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
            _heldout_loss_as_it_was(model, rows, 2, 0)
        got = heldout_loss(model, rows, 2, 0)["loss"]
    assert got == pytest.approx(expected, rel=1e-5)


def test_a_device_torch_cannot_use_fails_before_any_work(assets, tmp_path: Path) -> None:
    model, data = assets
    for spec, fix in (("cuda", "sees no cuda device"), ("cuda:3", "sees no cuda device"), ("nonsense", "not a device")):
        params = _params(tmp_path, model, data, spec)
        with pytest.raises(InputError, match=fix):
            prepare.run(params)  # even prepare, which computes on the CPU, refuses a run train could not do
        assert not (tmp_path / "artifacts" / "prepare").exists()


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The whole computing chain on the CPU, then on the simulated device (same params, same numbers expected)."""
    model, data = assets
    out: dict[str, Any] = {}
    for device in ("cpu", "sim"):
        tmp = tmp_path_factory.mktemp(device)
        params = _params(tmp, model, data, device, optimizer="paged_adamw_8bit", optimizer_page_budget_mb=0.01)
        with simulated_device() as sim:
            manifests = {s.STAGE: s.run(params) for s in (prepare, quantize, train, merge, evaluate, export)}
        out[device] = {"manifests": manifests, "syncs": sim.syncs, "root": tmp / "artifacts"}
    return out


def test_every_computing_stage_runs_on_the_device_and_records_it(runs) -> None:
    sim = runs["sim"]["manifests"]
    for stage in ("train", "evaluate", "export"):
        assert sim[stage].device == "sim:0", stage
        assert read_manifest(runs["sim"]["root"] / stage, stage).device == "sim:0"
    for stage in ("prepare", "quantize", "merge"):
        assert sim[stage].device == "cpu", f"{stage} computes on the CPU by design"
    assert sim["train"].metrics["device"] == "sim:0"
    assert sim["evaluate"].metrics["device"] == "sim:0"
    assert "sim:0" in (runs["sim"]["root"] / "evaluate" / "report.md").read_text()


def test_device_numbers_match_the_cpu_run(runs) -> None:
    cpu, sim = runs["cpu"]["manifests"], runs["sim"]["manifests"]
    # The device path hands transformers a ready 4-D mask; on the CPU transformers builds its own (same values).
    for key in ("val_loss_before", "val_loss_after", "first_loss", "final_loss"):
        assert sim["train"].metrics[key] == pytest.approx(cpu["train"].metrics[key], rel=1e-3), key
    for name, v in cpu["evaluate"].metrics["models"].items():
        assert sim["evaluate"].metrics["models"][name]["loss"] == pytest.approx(v["loss"], rel=1e-3), name
    for key in ("merged_bf16", "gguf_F16", "gptq", "rtn"):
        got, want = sim["export"].metrics["formats"][key]["loss"], cpu["export"].metrics["formats"][key]["loss"]
        assert got == pytest.approx(want, rel=1e-3), key


def test_a_training_step_reads_back_to_the_host_once(assets, tmp_path: Path) -> None:
    """Count host syncs of a 2-step and a 5-step run; the difference is 3 steps' worth and must be 3."""
    model, data = assets
    counts = {}
    for steps in (2, 5):
        # without the 16-bit baseline, which runs the same loop again (its steps read back once each as well)
        params = _params(
            tmp_path / str(steps), model, data, "sim", max_steps=steps, checkpoint_every=100, lora16_baseline=False
        )
        with simulated_device():
            prepare.run(params)
            quantize.run(params)
        with simulated_device() as sim:
            train.run(params)
        counts[steps] = sim.syncs
    per_site = Counter((s.op, s.where) for s in counts[5])
    per_site.subtract(Counter((s.op, s.where) for s in counts[2]))
    extra = {site: n for site, n in per_site.items() if n > 0}  # (< 0: tables the first run had cached already)
    assert sum(extra.values()) == 3, f"host syncs added by 3 more steps, per site: {extra}"
    ((op, where),) = extra
    assert op == "tolist" and where.startswith("stages/train.py:"), extra
