"""Power loss during training, simulated by truncating the files of the newest checkpoint: the next run skips it,
says so, resumes from the one before, and ends exactly where a run never interrupted ends (before: a traceback)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from qlora_pipeline.stages import prepare, quantize, train
from qlora_pipeline.stages.contract.params import parse_params
from tests import tiny

FAST = {"batch_size": 4, "max_steps": 8, "checkpoint_every": 2, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0}


def _adapter(tmp: Path) -> dict:
    return load_file(str(tmp / "artifacts" / "train" / "adapter" / "adapter_model.safetensors"))


def test_a_torn_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path, interrupt_training, caplog) -> None:
    model = tiny.make_model_dir(tmp_path / "model", "llama")
    data = tiny.write_jsonl(tmp_path / "pairs.jsonl", tiny.qa_rows(40))
    params = parse_params(tiny.params_for(tmp_path, model, data, train=FAST, evaluate={"batch_size": 4}))
    prepare.run(params)
    quantize.run(params)
    train.run(params)
    uninterrupted, uninterrupted_log = (
        _adapter(tmp_path),
        json.loads((tmp_path / "artifacts" / "train" / "train_log.json").read_text()),
    )
    interrupt_training(params, 5)  # checkpoints at steps 2 and 4 are on disk
    ckpts = sorted((tmp_path / "artifacts" / ".checkpoints").glob("train-*/step-*"))
    assert [p.name for p in ckpts] == ["step-0000002", "step-0000004"]
    (ckpts[-1] / "adapter.safetensors").write_bytes(b"")  # the unsynced file a power loss empties
    manifest = train.run(params)
    record = manifest.record
    assert record["resumed_from_step"] == 2
    assert record["skipped_checkpoints"] == ["step-0000004: adapter.safetensors does not match its checksum"]
    assert "damaged checkpoint step-0000004" in caplog.text and "resuming from step-0000002" in caplog.text
    log = json.loads((tmp_path / "artifacts" / "train" / "train_log.json").read_text())
    assert [e["loss"] for e in log] == [e["loss"] for e in uninterrupted_log]
    for k, v in uninterrupted.items():
        assert (_adapter(tmp_path)[k] == v).all(), k
