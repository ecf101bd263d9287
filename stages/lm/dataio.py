"""Reading instruction data (embedded chatterbot corpus or the user's file) into records, and splitting them."""

from __future__ import annotations

import importlib.util
import itertools
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_pipeline.stages.contract.artifacts import sha256_file
from qlora_pipeline.stages.contract.errors import InputError
from qlora_pipeline.stages.lm.conversations import (
    BadRow,
    Document,
    Example,
    FieldNames,
    Record,
    detect_format,
    parse_row,
    required_columns,
)

USER_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class RawData:
    records: list[Example]
    source_files: dict[str, str]
    """sha256 of every source file read: the dataset bytes an auditor traces a model back to."""
    n_read: int
    bad: dict[str, list[int]] = field(default_factory=dict)
    """Rows that could not be read, by reason: the row numbers (0-based, in file order)."""
    format: str = "pairs"


def chatterbot_dir() -> Path:
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "the embedded dataset package is not installed; run `pip install --no-deps chatterbot-corpus==1.3.3` "
            "(or `make setup`)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "english"


def load_chatterbot(root: Path | None = None) -> RawData:
    """Each conversation [s0, s1, ...] gives the pairs (s_i, s_{i+1}): every statement answers the previous."""
    import yaml

    root = root or chatterbot_dir()
    files = sorted(root.glob("*.yml"))
    if not files:
        raise InputError(f"no *.yml files under {root}; reinstall chatterbot-corpus==1.3.3")
    records: list[Record] = []
    hashes = chatterbot_hashes(root)
    for f in files:
        doc = yaml.safe_load(f.read_text()) or {}
        for conv in doc.get("conversations", []):
            turns = [str(t).strip() for t in conv]
            for a, b in itertools.pairwise(turns):
                records.append(Record(prompt=a, response=b, category=f.stem))
    return RawData(records=records, source_files=hashes, n_read=len(records))


def chatterbot_hashes(root: Path | None = None) -> dict[str, str]:
    """sha256 of each corpus file, labelled as manifests record them."""
    root = root or chatterbot_dir()
    return {f"chatterbot_corpus/english/{f.name}": sha256_file(f) for f in sorted(root.glob("*.yml"))}


def user_data_hashes(path: Path) -> dict[str, str]:
    """sha256 of the file, or of every file of a datasets folder, labelled as manifests record them."""
    if path.is_dir():
        return {str(p): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}
    return {str(path): sha256_file(path)}


def _read_table(path: Path) -> Any:
    """JSONL/CSV/Parquet file, or a folder written by `datasets.save_to_disk` (its 'train' split or itself)."""
    import datasets

    if not path.exists():
        raise InputError(
            f"dataset {path} does not exist; set data.path to a JSONL/CSV/Parquet file or a datasets folder"
        )
    if path.is_dir():
        try:
            ds: Any = datasets.load_from_disk(str(path))
        except Exception as exc:
            raise InputError(f"{path} is not a datasets folder written by save_to_disk ({exc})") from None
        if isinstance(ds, datasets.DatasetDict):
            split = "train" if "train" in ds else next(iter(ds))
            ds = ds[split]
        return ds
    kind = USER_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise InputError(
            f"unsupported dataset format '{path.suffix}' for {path}; use one of "
            f"{', '.join(USER_FORMATS)} or a datasets folder"
        )
    try:
        return datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as exc:
        raise InputError(f"could not read {path} as {kind} ({str(exc).splitlines()[0]}); check the file") from None


def load_user_data(path: Path, data_format: str, fields: FieldNames) -> RawData:
    """The user's table in any of the formats of :mod:`qlora_pipeline.stages.lm.conversations` (`auto`: detected
    from its columns); unreadable rows are counted by reason, not fatal (prepare decides)."""
    ds = _read_table(path)
    found = list(ds.column_names)
    fmt = detect_format(found, fields) if data_format == "auto" else data_format
    for column in required_columns(fmt, fields):  # type: ignore[arg-type]
        if column not in found:
            hint = (
                "set data.prompt_field / data.response_field / data.system_field"
                if fmt == "pairs"
                else "set data.format"
            )
            raise InputError(
                f"dataset {path} has no field '{column}' for the {fmt} format; fields found: {', '.join(found)}; "
                f"{hint} in params.yaml"
            )
    records: list[Example] = []
    bad: dict[str, list[int]] = {}
    for i, row in enumerate(ds):
        parsed = parse_row(i, row, fmt, fields)  # type: ignore[arg-type]
        if isinstance(parsed, BadRow):
            bad.setdefault(parsed.reason, []).append(i)
        else:
            records.append(parsed)
    return RawData(records=records, source_files=user_data_hashes(path), n_read=len(ds), bad=bad, format=fmt)


def dedupe_by_prompt(records: list[Example]) -> list[Example]:
    """Keep the first response of each prompt (with the turns before it), the first copy of each document: repeats
    would leak across the splits."""
    seen: set[str] = set()
    out = []
    for r in records:
        if isinstance(r, Document):
            text = r.text
        elif not r.prompt or not r.response:
            continue
        else:
            text = " ".join([*(t for _, t in r.history), r.prompt])
        key = " ".join(text.lower().split())
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def split_records(
    records: list[Example], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[Example]]:
    """Seeded shuffle then cut, by whole document or conversation; independent of platform and library versions
    (Python's Mersenne Twister)."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n = len(order)
    n_test = max(1, math.ceil(round(n * test_fraction, 6)))  # ceil, robust to float noise
    n_val = int(n * val_fraction)
    test = [records[i] for i in order[:n_test]]
    val = [records[i] for i in order[n_test : n_test + n_val]]
    train = [records[i] for i in order[n_test + n_val :]]
    return {"train": train, "validation": val, "test": test}
