"""A test split left empty once over-long prompts are dropped is refused at prepare, in one line: evaluate would
report loss 0 / perplexity 1.0 on it and export would crash."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from qlora_pipeline.stages.contract.errors import InputError
from qlora_pipeline.stages.contract.params import parse_params
from qlora_pipeline.stages.lm.conversations import Record
from qlora_pipeline.stages.prepare import tokenize_splits


def test_a_test_split_with_no_example_that_fits_is_refused(tiny_llama_dir_for_faults) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir_for_faults)
    params = parse_params({"data": {"max_length": 64}})
    short = [Record(prompt=f"question {i}?", response=f"answer {i}.") for i in range(6)]
    long = [Record(prompt="word " * 200, response="too long")] * 2
    with pytest.raises(InputError) as err:
        tokenize_splits({"train": short, "validation": short[:2], "test": long}, tok, params)
    msg = str(err.value)
    assert msg.startswith("no test example fits data.max_length=64 (all 2 have longer prompts)"), msg
    assert "\n" not in msg
    dsd, stats = tokenize_splits({"train": short, "validation": short[:2], "test": short[:2]}, tok, params)
    assert stats["test"]["examples"] == 2 and len(dsd["test"]) == 2
