"""params.yaml validation: every kind of bad value gives one line naming key, value and what is allowed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qlora_pipeline.stages.contract.errors import ParamsError
from qlora_pipeline.stages.contract.params import Params, load_params, parse_params

REPO = Path(__file__).resolve().parents[2]


def test_repo_params_yaml_is_valid_and_matches_defaults() -> None:
    p = load_params(REPO / "params.yaml")
    assert p.train.lora_r == 16 and p.quantize.blocksize == 64
    assert p.model_dump() == Params().model_dump()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"train": {"lora_rr": 8}}, "unknown key 'train.lora_rr'; allowed keys in train: lora_r,"),
        ({"bogus": {}}, "unknown key 'bogus'; allowed keys in top level: model, data"),
        ({"train": {"lora_r": 0}}, "train.lora_r = 0 is out of range; it must be ≥ 1"),
        ({"train": {"learning_rate": -1}}, "train.learning_rate = -1 is out of range; it must be > 0"),
        ({"quantize": {"blocksize": 48}}, "quantize.blocksize = 48 is not allowed; expected one of 32, 64"),
        ({"train": {"batch_size": "eight"}}, "train.batch_size = 'eight' is invalid"),
        ({"data": {"val_fraction": 0.7}}, "data.val_fraction = 0.7 is out of range; it must be < 0.5"),
        ({"model": {"source": "local"}}, "model.path is required when model.source is 'local'"),
        ({"train": {"optimizer": "sgd"}}, "train.optimizer = 'sgd' is not allowed"),
    ],
)
def test_bad_values_name_key_value_and_allowed(raw: dict, expected: str) -> None:
    with pytest.raises(ParamsError) as exc:
        parse_params(raw)
    msg = str(exc.value)
    assert expected in msg
    assert "\n" not in msg
    assert msg.endswith("fix it in params.yaml") or "fix it in params.yaml" in msg


def test_not_a_mapping() -> None:
    with pytest.raises(ParamsError, match="must be a mapping of sections"):
        parse_params([1, 2])


def test_invalid_yaml_reports_line(tmp_path: Path) -> None:
    f = tmp_path / "params.yaml"
    f.write_text("train:\n  lora_r: [16\n")
    with pytest.raises(ParamsError, match=r"is not valid YAML \(line \d+, column \d+\)"):
        load_params(f)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_cli_exit_code_one_line_and_nothing_written(tmp_path: Path) -> None:
    raw = {
        "train": {"lora_r": 0},
        "tracking": {"artifacts_dir": str(tmp_path / "art"), "metrics_dir": str(tmp_path / "met")},
    }
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(raw))
    proc = subprocess.run(
        [sys.executable, "-m", "qlora_pipeline.pipelines.cli", "stage", "prepare", "--params", str(f)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    err_lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert err_lines == [f"error: {f}: train.lora_r = 0 is out of range; it must be ≥ 1; fix it in {f}"]
    assert not (tmp_path / "art").exists() and not (tmp_path / "met").exists()


def test_a_stage_sees_only_the_params_fields_it_declares() -> None:
    from qlora_pipeline.stages.contract.params import DeclaredParams, UndeclaredParamError
    from qlora_pipeline.stages.contract.registry import STAGES

    params = parse_params({"evaluate": {"batch_size": 3, "num_generations": 7}})
    view = DeclaredParams(params, STAGES["train"].params, "train")
    assert view.train.lora_r == 16 and view.evaluate.batch_size == 3 and view.runtime.device == "auto"
    assert view.section("train") == params.section("train")
    with pytest.raises(UndeclaredParamError, match=r"stage train reads evaluate.num_generations"):
        _ = view.evaluate.num_generations
    with pytest.raises(UndeclaredParamError, match="section 'export'"):
        _ = view.export
    with pytest.raises(UndeclaredParamError, match="declares only some fields"):
        view.section("evaluate")
    assert STAGES["train"].param_values(params) == {
        "runtime": {"device": "auto"},
        "train": params.section("train"),
        "evaluate": {"batch_size": 3},
        "data": {"max_length": 256},  # packed rows are this long
    }
