"""Our GPTQ checkpoint through a real reader: transformers' GPTQ integration with gptqmodel's kernels.

gptqmodel 7.6.0 pins numpy 2.2.6 (ours: 2.4), so it lives in its own venv, `.venv-gptq` (`make gptq-oracle`;
CI builds it in .ci/run), and reads the checkpoint in a child process. Without that venv this file skips.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_pipeline.kernels.formats.gptq_folder import unpack_gptq_v1, write_gptq_checkpoint
from qlora_pipeline.stages.contract.runtime import REPO_ROOT
from tests import tiny
from tests.gptq_reader import read_gptq_v1

ORACLE_PYTHON = Path(os.environ.get("QLORA_GPTQ_PYTHON", REPO_ROOT / ".venv-gptq" / "bin" / "python"))
IDS = [1, 5, 9, 33, 70, 2, 100, 7]
PACKED = ("qweight", "qzeros", "scales", "g_idx")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> dict:
    if not ORACLE_PYTHON.exists():
        pytest.skip(f"no transformers+gptqmodel venv at {ORACLE_PYTHON} (make gptq-oracle)")
    tmp = tmp_path_factory.mktemp("gptq-real")
    base = tiny.make_model_dir(tmp / "base", "llama", hidden_size=128, intermediate_size=256)
    calib = [torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    write_gptq_checkpoint(base, tmp / "q", calib, group_size=32)
    out = tmp / "read.json"
    child = REPO_ROOT / "tests" / "gptq_loader_child.py"
    proc = subprocess.run(
        [str(ORACLE_PYTHON), str(child), str(tmp / "q"), json.dumps(IDS), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"base": base, "q": tmp / "q", **json.loads(out.read_text())}


def test_gptqmodel_dequantizes_every_layer_to_our_weights(loaded) -> None:
    sd = load_file(loaded["q"] / "model.safetensors")
    assert loaded["kernel"] != "Linear" and len(loaded["weights"]) == 14
    for name, theirs in loaded["weights"].items():
        tensors = {k: sd[f"{name}.{k}"] for k in PACKED}
        ours = read_gptq_v1(tensors)
        theirs = torch.tensor(theirs)
        # fp16 scale × small integer is exact in fp32; gptqmodel computes it in fp16: one rounding apart at most
        assert torch.equal(ours.half(), theirs.half()), name
        assert torch.equal(unpack_gptq_v1(tensors), ours), name


def test_transformers_logits_match_the_weights_we_wrote(loaded) -> None:
    """Measured 2026-12-03: transformers+gptqmodel (bf16 activations) vs our fp32 model on the same GPTQ weights
    differ by 0.0054 at most (logits span ±1.6); the quantization itself moves them by 0.16."""
    from transformers import AutoModelForCausalLM

    sd = load_file(loaded["q"] / "model.safetensors")
    ours = AutoModelForCausalLM.from_pretrained(loaded["base"], dtype=torch.float32).eval()
    for name, module in ours.named_modules():
        if f"{name}.qweight" in sd:
            module.weight.data = read_gptq_v1({k: sd[f"{name}.{k}"] for k in PACKED})
    with torch.no_grad():
        mine = ours(torch.tensor([IDS])).logits[0]
    theirs = torch.tensor(loaded["logits"])
    assert float((mine - theirs).abs().max()) < 0.02
