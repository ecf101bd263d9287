"""Resume semantics a user can predict: the schedule, the run's length and (with packing) batch_size x grad_accum
may change and the run continues from its checkpoint; anything else, or the training code, starts over and says
what changed (before: any change started over silently)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from qlora_pipeline.stages import prepare, quantize, train
from qlora_pipeline.stages.contract.params import parse_params
from tests import tiny

FAST = {"batch_size": 4, "max_steps": 8, "checkpoint_every": 2, "lora_r": 4, "lora_alpha": 8, "learning_rate": 5e-3}


@pytest.fixture
def run_dir(tmp_path: Path):
    model = tiny.make_model_dir(tmp_path / "model", "llama")
    data = tiny.write_jsonl(tmp_path / "pairs.jsonl", tiny.qa_rows(40))

    def params(**train_over: object):
        raw = tiny.params_for(tmp_path, model, data, train={**FAST, **train_over}, evaluate={"batch_size": 4})
        return parse_params(raw)

    prepare.run(params())
    quantize.run(params())
    return params


@pytest.mark.parametrize(
    "change",
    [{"learning_rate": 1e-3, "max_steps": 10}, {"batch_size": 2, "grad_accum": 2}, {"lr_schedule": "cosine"}],
    ids=["lr-and-steps", "same-examples-per-step", "schedule"],
)
def test_a_resumable_change_continues_from_the_checkpoint(run_dir, interrupt_training, change) -> None:
    interrupt_training(run_dir(), 5)
    record = train.run(run_dir(**change)).record
    assert record["resumed_from_step"] == 4 and record["started_over"] is None, record


def test_another_change_starts_over_and_says_what_changed(run_dir, interrupt_training, caplog) -> None:
    interrupt_training(run_dir(), 5)
    record = train.run(run_dir(lora_r=8)).record
    assert record["resumed_from_step"] is None
    assert "cannot continue this one (train.lora_r 4 -> 8)" in record["started_over"], record
    assert "starting over: checkpoints of an earlier run" in caplog.text


def test_a_change_of_the_training_code_starts_over(run_dir, interrupt_training, monkeypatch, tmp_path) -> None:
    from qlora_pipeline.stages.contract import codedeps

    interrupt_training(run_dir(), 5)
    source = tmp_path / "source"
    for folder in codedeps.FOLDERS:
        shutil.copytree(Path(codedeps.SOURCE_ROOT) / folder, source / folder)
    adamw = source / "kernels" / "optim" / "adamw.py"
    adamw.write_text(adamw.read_text() + "\n# a changed update rule\n")
    monkeypatch.setattr(codedeps, "SOURCE_ROOT", source)
    record = train.run(run_dir()).record
    assert record["resumed_from_step"] is None
    assert record["started_over"].endswith("(the training code)"), record
