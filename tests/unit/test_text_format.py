"""Plain text (continued pretraining): no chat template, every token labelled, documents cut into rows of
max_length closed by EOS, through prepare, packed training and evaluation on a base model without a template."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import datasets
import pytest
from transformers import AutoTokenizer

from qlora_pipeline.stages import evaluate, merge, prepare, quantize, train
from qlora_pipeline.stages.contract.params import parse_params
from qlora_pipeline.stages.lm import dataio
from qlora_pipeline.stages.lm.conversations import Document, FieldNames, parse_row
from tests import tiny

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "while",
    "rain",
    "fell",
    "over",
    "quiet",
    "hills",
    "and",
    "rivers",
    "ran",
    "to",
    "the",
    "sea",
]


def _documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 60))) + "." for _ in range(n)]


@pytest.fixture
def base_model_dir(tmp_path: Path) -> Path:
    """A tiny Llama saved without a chat template: a base model, as continued pretraining starts from."""
    path = tiny.make_model_dir(tmp_path / "base", "llama")
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    (path / "chat_template.jinja").unlink(missing_ok=True)
    assert not AutoTokenizer.from_pretrained(path).chat_template
    return path


def test_text_rows_are_detected_and_bad_ones_counted(tmp_path: Path) -> None:
    fields = FieldNames(prompt="instruction", response="response", system=None, text="body")
    rows = [{"body": "One document."}, {"body": "  "}, {"body": 7}, {"body": "Another."}]
    raw = dataio.load_user_data(tiny.write_jsonl(tmp_path / "t.jsonl", rows), "auto", fields)
    assert raw.format == "text" and raw.records == [Document("One document."), Document("Another.")]
    assert raw.bad == {"empty text": [1], "text is not a string": [2]}
    assert parse_row(0, {"body": "x"}, "text", fields) == Document("x")


def test_plain_text_through_prepare_packed_train_and_evaluate(tmp_path: Path, base_model_dir: Path) -> None:
    docs = _documents(60)
    data = tiny.write_jsonl(tmp_path / "corpus.jsonl", [{"text": d} for d in docs])
    raw = tiny.params_for(tmp_path, base_model_dir, data)
    raw["data"].update({"max_length": 64})
    raw["train"] = {
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "learning_rate": 5e-3,
        "warmup_ratio": 0.0,
        "batch_size": 2,
        "packing": True,
        "epochs": 2.0,
        "compute_dtype": "float32",
    }
    raw["evaluate"] = {"batch_size": 4, "num_generations": 2, "max_new_tokens": 4}
    params = parse_params(raw)
    m = prepare.run(params)
    assert m.metrics["data_format"] == "text"
    tok = AutoTokenizer.from_pretrained(base_model_dir)
    dsd = datasets.load_from_disk(str(tmp_path / "artifacts" / "prepare" / "data"))
    long_docs = 0
    by_doc: dict[str, list[int]] = {}
    for split in ("train", "validation", "test"):
        for row in dsd[split]:
            assert row["labels"] == row["input_ids"] and 2 <= len(row["input_ids"]) <= 64  # loss on every token
    # every document comes back whole: its rows, in order, are its tokens and one EOS
    for doc in docs:
        ids = [*tok(doc)["input_ids"], tok.eos_token_id]
        long_docs += len(ids) > 64
        by_doc[doc] = ids
    rows = [r for s in ("train", "validation", "test") for r in dsd[s]["input_ids"]]
    assert sorted(map(tuple, rows)) == sorted(
        tuple(ids[i : i + 64]) for ids in by_doc.values() for i in range(0, len(ids), 64) if len(ids[i : i + 64]) > 1
    )
    assert long_docs and sum(s["truncated"] for s in m.metrics["splits"].values()) == long_docs
    assert m.metrics["splits"]["train"]["loss_token_share"] == 1.0

    quantize.run(params)
    t = train.run(params)
    assert t.metrics["val_loss_after"] < t.metrics["val_loss_before"] - 0.3
    merge.run(params)
    e = evaluate.run(params)
    gens = json.loads((tmp_path / "artifacts" / "evaluate" / "generations.json").read_text())
    test0 = dsd["test"][0]
    assert gens[0]["prompt"] == tok.decode(
        test0["input_ids"][: min(32, len(test0["input_ids"]) // 2)], skip_special_tokens=True
    )
    assert "<|im_start|>" not in gens[0]["prompt"] and set(gens[0]["outputs"]) == {
        "base_16bit",
        "lora16",
        "nf4_adapter",
        "merged",
    }
    assert e.metrics["models"]["nf4_adapter"]["loss"] < e.metrics["models"]["base_16bit"]["loss"]
    shutil.rmtree(tmp_path / "artifacts", ignore_errors=True)
