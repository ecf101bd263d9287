"""A model index naming shards outside its folder (`../`) is refused at prepare in one line, before anything is
copied, read or written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qlora_pipeline.kernels.formats.hf_folder import INDEX_FILE, weight_files
from tests import tiny


@pytest.mark.parametrize("name", ["../../evil.safetensors", "/etc/passwd", "sub/x.safetensors", "..", "x.bin"])
def test_an_index_naming_a_path_outside_the_folder_is_refused(tmp_path: Path, name: str) -> None:
    model = tiny.make_model_dir(tmp_path / "model", "llama")
    (model / "model.safetensors").rename(model / "model-00001-of-00001.safetensors")
    keys = ["model.embed_tokens.weight", "lm_head.weight"]
    index = {"weight_map": {keys[0]: "model-00001-of-00001.safetensors", keys[1]: name}}
    (model / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"not a \.safetensors file in that folder"):
        weight_files(model)
    data = tiny.write_jsonl(tmp_path / "pairs.jsonl", tiny.qa_rows(20))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny.params_for(tmp_path, model, data)))
    cli = [sys.executable, "-m", "qlora_pipeline.pipelines.cli", "stage", "prepare", "-p", str(params)]
    out = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("error: base model: ") and repr(name) in line and "replace it" in line, line
    assert not (tmp_path / "artifacts" / "prepare").exists()
    assert not (tmp_path / "evil.safetensors").exists() and not (tmp_path.parent / "evil.safetensors").exists()
