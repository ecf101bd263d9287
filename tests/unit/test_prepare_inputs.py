"""What the README promises about user data: JSONL, CSV, Parquet and `datasets` folders; per-row and default system
prompts; `max_examples`; truncation at `max_length` (README "Your own model and data", params.yaml data.*)."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
from transformers import AutoTokenizer

from qlora_pipeline.stages import prepare
from qlora_pipeline.stages.contract.params import parse_params
from tests import tiny


def _prepare(tmp_path: Path, model_dir: Path, data_path: Path, **data: object) -> tuple[dict, datasets.DatasetDict]:
    raw = tiny.params_for(tmp_path, model_dir, data_path)
    raw["data"].update(data)
    m = prepare.run(parse_params(raw))
    return m.metrics, datasets.load_from_disk(str(tmp_path / "artifacts" / "prepare" / "data"))


def _all_rows(dsd: datasets.DatasetDict) -> list[dict]:
    return [row for split in dsd.values() for row in split]


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet", "save_to_disk"])
def test_every_input_format_gives_the_same_examples(kind: str, tmp_path: Path, tiny_llama_dir: Path) -> None:
    """One table written four ways: the tokenized dataset must be identical whichever format it came in."""
    rows = tiny.qa_rows(40)
    table = datasets.Dataset.from_list(rows)
    path = {
        "jsonl": tmp_path / "data" / "pairs.jsonl",
        "csv": tmp_path / "data" / "pairs.csv",
        "parquet": tmp_path / "data" / "pairs.parquet",
        "save_to_disk": tmp_path / "data" / "pairs_ds",
    }[kind]
    path.parent.mkdir(parents=True, exist_ok=True)
    {
        "jsonl": lambda: tiny.write_jsonl(path, rows),
        "csv": lambda: table.to_csv(str(path), index=False),
        "parquet": lambda: table.to_parquet(str(path)),
        "save_to_disk": lambda: table.save_to_disk(str(path)),
    }[kind]()
    metrics, dsd = _prepare(tmp_path / kind, tiny_llama_dir, path)
    assert metrics["records_read"] == 40
    reference = tmp_path / "ref.jsonl"
    tiny.write_jsonl(reference, rows)
    _, ref = _prepare(tmp_path / "ref", tiny_llama_dir, reference)
    for split in ("train", "validation", "test"):
        assert dsd[split]["input_ids"] == ref[split]["input_ids"], split
        assert dsd[split]["labels"] == ref[split]["labels"], split


def test_system_prompt_per_row_and_default(tmp_path: Path, tiny_llama_dir: Path) -> None:
    rows = [{**r, "persona": "You answer like a pirate" if i % 2 else ""} for i, r in enumerate(tiny.qa_rows(40))]
    path = tiny.write_jsonl(tmp_path / "data" / "pairs.jsonl", rows)
    _, dsd = _prepare(tmp_path, tiny_llama_dir, path, system_field="persona", system_prompt="Be brief")
    tok = AutoTokenizer.from_pretrained(tmp_path / "artifacts" / "prepare" / "model")
    by_prompt = {r["instruction"]: r["persona"] for r in rows}
    for row in _all_rows(dsd):
        text = tok.decode(row["input_ids"])
        system = by_prompt[row["prompt"]] or "Be brief"  # an empty per-row value falls back to system_prompt
        assert text.startswith(f"<|im_start|>system\n{system}<|im_end|>"), text[:80]
        labelled = [t for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != -100]
        assert system not in tok.decode(labelled), "the system prompt is never trained on"


def test_max_examples_caps_the_dataset_after_dedupe(tmp_path: Path, tiny_llama_dir: Path, qa_jsonl: Path) -> None:
    metrics, dsd = _prepare(tmp_path, tiny_llama_dir, qa_jsonl, max_examples=20)
    assert metrics["records_read"] == 40 and metrics["records_after_dedupe"] == 20
    assert sum(len(s) for s in dsd.values()) == 20


def test_long_replies_are_cut_at_max_length_and_counted(tmp_path: Path, tiny_llama_dir: Path) -> None:
    long_reply = " ".join(f"word{i}" for i in range(200))
    rows = [{"instruction": f"Question {i}?", "response": long_reply if i < 10 else f"Answer {i}."} for i in range(40)]
    path = tiny.write_jsonl(tmp_path / "data" / "pairs.jsonl", rows)
    metrics, dsd = _prepare(tmp_path, tiny_llama_dir, path, max_length=128)
    for row in _all_rows(dsd):
        assert len(row["input_ids"]) <= 128 and len(row["labels"]) == len(row["input_ids"])
    truncated = sum(s["truncated"] for s in metrics["splits"].values())
    assert truncated == 10
    cut = [r for r in _all_rows(dsd) if r["response"] == long_reply]
    assert cut and all(len(r["input_ids"]) == 128 and r["labels"][-1] != -100 for r in cut)
