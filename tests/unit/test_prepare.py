"""prepare stage on a tiny random model and a small JSONL dataset."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import datasets
import pytest
from transformers import AutoTokenizer

from qlora_pipeline.stages import prepare
from qlora_pipeline.stages.contract import artifacts
from qlora_pipeline.stages.contract.errors import InputError, ParamsError
from qlora_pipeline.stages.contract.params import parse_params
from qlora_pipeline.stages.contract.stage import DiskFull
from qlora_pipeline.stages.lm import dataio
from qlora_pipeline.stages.lm.conversations import Record
from tests import tiny


def _run(tmp_path: Path, model_dir: Path, data_path: Path, **sections: dict):
    return prepare.run(parse_params(tiny.params_for(tmp_path, model_dir, data_path, **sections)))


def test_prepare_writes_model_data_manifest_and_metrics(tmp_path, tiny_llama_dir, qa_jsonl) -> None:
    m = _run(tmp_path, tiny_llama_dir, qa_jsonl)
    out = tmp_path / "artifacts" / "prepare"
    assert (out / "model" / "config.json").exists() and (out / "model" / "model.safetensors").exists()
    dsd = datasets.load_from_disk(str(out / "data"))
    assert {k: len(v) for k, v in dsd.items()} == {"train": 32, "validation": 4, "test": 4}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "prepare"
    assert set(manifest["outputs"]) == set(artifacts.hash_tree(out))
    assert any(k.startswith("dataset/") for k in manifest["inputs"])
    assert manifest["memory"]["peak_rss_mb"] > 0 and manifest["timings"]["wall_s"] > 0
    assert manifest["code_version"]["commit"] is not None
    metrics = json.loads((tmp_path / "metrics" / "prepare.json").read_text())
    assert metrics["metrics"]["splits"]["train"]["examples"] == 32
    assert m.metrics["records_after_dedupe"] == 40
    record = prepare.PrepareRecord.of(m)  # the typed record round-trips through manifest.json
    assert record == prepare.PrepareRecord.of(artifacts.read_manifest(out, "prepare"))
    assert record.architecture == "LlamaForCausalLM" and record.base_model_source == "local"
    assert record.config_sha256 == hashlib.sha256((tiny_llama_dir / "config.json").read_bytes()).hexdigest()
    # the data report: the share of tokens the loss sees, from the stored labels; the histogram is a real PNG
    train = dsd["train"]
    labelled = sum(sum(1 for t in lab if t != -100) for lab in train["labels"])
    share = m.metrics["splits"]["train"]["loss_token_share"]
    assert share == round(labelled / sum(len(ids) for ids in train["input_ids"]), 4) and 0 < share < 1
    report = (out / "data_report.md").read_text()
    assert report.startswith("## Data") and "| train | 32 | 0 | 0 |" in report and f"{share:.1%}" in report
    assert (out / "token_lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert manifest["code_hash"] and manifest["params"]["data"]["seed"] == 0


def test_labels_cover_exactly_the_response(tmp_path, tiny_llama_dir, qa_jsonl) -> None:
    _run(tmp_path, tiny_llama_dir, qa_jsonl)
    out = tmp_path / "artifacts" / "prepare"
    tok = AutoTokenizer.from_pretrained(out / "model")
    dsd = datasets.load_from_disk(str(out / "data"))
    for split in dsd.values():
        for ex in split:
            kept = [t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != -100]
            assert tok.decode(kept) == ex["response"] + "<|im_end|>"
            # everything before the reply (system, user, framing) is masked
            first = next(i for i, lab in enumerate(ex["labels"]) if lab != -100)
            assert tok.decode(ex["input_ids"][:first]).endswith("<|im_start|>assistant\n")


def test_split_is_deterministic_and_seeded() -> None:
    recs = [Record(f"p{i}", f"r{i}") for i in range(101)]
    a = dataio.split_records(recs, 0.1, 0.1, seed=0)
    b = dataio.split_records(recs, 0.1, 0.1, seed=0)
    c = dataio.split_records(recs, 0.1, 0.1, seed=1)
    assert a == b and a != c
    assert [len(a[k]) for k in ("train", "validation", "test")] == [80, 10, 11]
    assert {r.prompt for s in a.values() for r in s} == {r.prompt for r in recs}


def test_rerun_gives_identical_dataset_bytes(tmp_path, tiny_llama_dir, qa_jsonl) -> None:
    m1 = _run(tmp_path / "a", tiny_llama_dir, qa_jsonl)
    m2 = _run(tmp_path / "b", tiny_llama_dir, qa_jsonl)
    data1 = {k: v for k, v in m1.outputs.items() if k.startswith("data/") and k.endswith(".arrow")}
    data2 = {k: v for k, v in m2.outputs.items() if k.startswith("data/") and k.endswith(".arrow")}
    assert data1 and data1 == data2


def test_missing_field_names_it_and_lists_found(tmp_path, tiny_llama_dir) -> None:
    data = tiny.write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}] * 5)
    with pytest.raises(
        InputError,
        match=r"cannot tell the dataset's format from its fields \(answer, question\): expected 'instruction' \+ "
        r"'response' \(data.prompt_field / data.response_field\), 'messages'",
    ):
        _run(tmp_path, tiny_llama_dir, data)
    with pytest.raises(InputError, match=r"has no field 'instruction' for the pairs format; fields found: question"):
        _run(tmp_path, tiny_llama_dir, data, data={"format": "pairs"})
    assert not (tmp_path / "artifacts" / "prepare").exists()


def test_field_names_are_configurable(tmp_path, tiny_llama_dir) -> None:
    rows = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(12)]
    data = tiny.write_jsonl(tmp_path / "d.jsonl", rows)
    m = _run(tmp_path, tiny_llama_dir, data, data={"prompt_field": "q", "response_field": "a"})
    assert m.metrics["records_after_dedupe"] == 12


def test_empty_after_dedupe(tmp_path, tiny_llama_dir) -> None:
    rows = [{"instruction": "same prompt", "response": f"r{i}"} for i in range(10)] + [
        {"instruction": "", "response": "x"}
    ]
    data = tiny.write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(
        InputError,
        match=r"has 1 usable example\(s\) after dropping empty and duplicate prompts "
        r"\(read 11\)",
    ):
        _run(tmp_path, tiny_llama_dir, data, data={"max_bad_fraction": 0.5})  # the empty prompt is a bad row
    assert not (tmp_path / "artifacts" / "prepare").exists()


def test_unsupported_architecture(tmp_path, tiny_llama_dir, qa_jsonl) -> None:
    bad = tmp_path / "gpt2ish"
    shutil.copytree(tiny_llama_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        InputError,
        match=r"unsupported architecture GPT2LMHeadModel in .*; supported: LlamaForCausalLM, Qwen2ForCausalLM, Mistral",
    ):
        _run(tmp_path, bad, qa_jsonl)


def test_qwen2_is_supported(tmp_path, tiny_qwen2_dir, qa_jsonl) -> None:
    assert _run(tmp_path, tiny_qwen2_dir, qa_jsonl).metrics["architecture"] == "Qwen2ForCausalLM"


@pytest.mark.parametrize("damage", ["truncate", "missing_dir", "no_weights", "bad_config"])
def test_broken_model_folder(tmp_path, tiny_llama_dir, qa_jsonl, damage) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama_dir, bad)
    st = bad / "model.safetensors"
    if damage == "truncate":
        st.write_bytes(st.read_bytes()[:-1000])
        pattern = "truncated|not a readable safetensors"
    elif damage == "missing_dir":
        shutil.rmtree(bad)
        pattern = "does not exist"
    elif damage == "no_weights":
        st.unlink()
        pattern = r"has no \*\.safetensors weights"
    else:
        (bad / "config.json").write_text("{not json")
        pattern = "config.json is not valid JSON"
    with pytest.raises(InputError, match=pattern):
        _run(tmp_path, bad, qa_jsonl)
    assert not (tmp_path / "artifacts" / "prepare").exists()


def test_crash_while_writing_leaves_previous_artifact(tmp_path, tiny_llama_dir, qa_jsonl, monkeypatch) -> None:
    first = _run(tmp_path, tiny_llama_dir, qa_jsonl)
    out = tmp_path / "artifacts" / "prepare"
    before = artifacts.hash_tree(out)

    def boom(self, path, *a, **k):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "partial.arrow").write_bytes(b"half")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", boom)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, tiny_llama_dir, qa_jsonl, data={"seed": 5})
    assert artifacts.hash_tree(out) == before
    assert artifacts.verify_artifact(out, "prepare").created_at == first.created_at
    leftovers = [p.name for p in (tmp_path / "artifacts").iterdir() if p.name != "prepare"]
    assert leftovers == [".lock"], "only the run lock's file (free once its process ends)"


def test_crash_on_first_run_leaves_nothing(tmp_path, tiny_llama_dir, qa_jsonl, monkeypatch) -> None:
    monkeypatch.setattr(
        datasets.DatasetDict,
        "save_to_disk",
        lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")),
    )
    with pytest.raises(DiskFull, match="disk full while prepare wrote"):
        _run(tmp_path, tiny_llama_dir, qa_jsonl)
    assert [p.name for p in (tmp_path / "artifacts").iterdir()] == [".lock"]


@pytest.mark.parametrize("tamper", ["edit", "delete", "add"])
def test_tampered_artifact_is_refused(tmp_path, tiny_llama_dir, qa_jsonl, tamper) -> None:
    _run(tmp_path, tiny_llama_dir, qa_jsonl)
    out = tmp_path / "artifacts" / "prepare"
    target = out / "model" / "config.json"
    if tamper == "edit":
        target.write_text(target.read_text().replace("64", "65", 1))
        pattern = "does not match its manifest"
    elif tamper == "delete":
        target.unlink()
        pattern = "is missing but listed in its manifest"
    else:
        (out / "model" / "extra.bin").write_bytes(b"x")
        pattern = "is not listed in the prepare manifest"
    with pytest.raises(InputError, match=pattern):
        artifacts.verify_artifact(out, "prepare")


YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize(
    ("arch", "model_overrides", "export", "expected"),
    [
        (
            "llama",
            {"rope_parameters": YARN},
            {},
            r"GGUF export would fail .*'yarn'.*; change export.gguf_types \(\[\] skips GGUF\)",
        ),
        (
            "llama",
            {},
            {"gptq_group_size": 48},
            r"GPTQ export would fail .*group size 48 does not divide the 64 input columns",
        ),
        (
            "gemma3",
            {"query_pre_attn_scalar": 32},
            {},
            r"GGUF export would fail .*query_pre_attn_scalar is 32 but llama\.cpp scales a 2-layer gemma3 model's "
            r"queries by 1/sqrt\(16\)",
        ),
    ],
)
def test_prepare_refuses_a_model_export_could_not_write(
    tmp_path, qa_jsonl, arch, model_overrides, export, expected
) -> None:
    """A run that would fail at export fails at prepare's preflight: one line, the setting to change, no artifact."""
    model = tiny.make_model_dir(tmp_path / "model", arch, **model_overrides)
    params = parse_params(tiny.params_for(tmp_path, model, qa_jsonl, export=export))
    with pytest.raises(InputError, match=expected) as err:
        prepare.run(params)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "artifacts").exists() or not any((tmp_path / "artifacts").iterdir())


def test_prepare_takes_a_llama31_model(tmp_path, qa_jsonl) -> None:
    """Llama 3.1's `llama3` rope scaling and untied head pass the export preflight (the GGUF writer handles both)."""
    model = tiny.make_model_dir(
        tmp_path / "model", "llama", rope_parameters=tiny.LLAMA31_ROPE, tie_word_embeddings=False
    )
    m = prepare.run(parse_params(tiny.params_for(tmp_path, model, qa_jsonl)))
    assert m.metrics["architecture"] == "LlamaForCausalLM"


def test_prepare_reads_a_hub_id_from_the_local_cache_offline(tmp_path, tiny_llama_dir, qa_jsonl, monkeypatch) -> None:
    """`model.source: hf` resolves org/name in the Hugging Face cache without the network; artifacts name the base
    `org/name@commit`; an id the cache lacks is one line naming the cache."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    shutil.copytree(tiny_llama_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    raw = tiny.params_for(tmp_path, tiny_llama_dir, qa_jsonl)
    raw["model"] = {"source": "hf", "path": "tiny-org/tiny-llama"}
    m = prepare.run(parse_params(raw))
    assert prepare.PrepareRecord.of(m).base_model_id == f"tiny-org/tiny-llama@{commit}"
    raw["model"]["path"] = "tiny-org/absent"
    with pytest.raises(InputError, match=r"tiny-org/absent \(revision main\) is not in the Hugging Face cache .*hub;"):
        prepare.run(parse_params(raw))
    with pytest.raises(ParamsError, match="is not a hub id"):
        parse_params({"model": {"source": "hf", "path": "just-a-name"}})


def test_prepare_refuses_lora_targets_the_family_does_not_have(tmp_path, qa_jsonl) -> None:
    """Phi-3 fuses its projections: Llama's target names are refused at prepare, naming the ones it has."""
    model = tiny.make_model_dir(tmp_path / "model", "phi3")
    raw = tiny.params_for(tmp_path, model, qa_jsonl, train={"target_modules": ["q_proj", "v_proj"]})
    with pytest.raises(
        InputError, match=r"names q_proj, which Phi3ForCausalLM does not have \(its projections: qkv_proj"
    ):
        prepare.run(parse_params(raw))


def test_a_manifest_from_an_older_version_is_one_line_not_a_crash() -> None:
    old = artifacts.Manifest(stage="prepare", params={}, code_version={}, record={"base_model": {"path": "/x"}})
    with pytest.raises(InputError, match=r"lacks what this version records \(PrepareRecord\); re-run `qlora stage"):
        prepare.PrepareRecord.of(old)


def test_prepare_refuses_a_run_the_disk_cannot_hold(tmp_path, tiny_llama_dir, qa_jsonl, monkeypatch) -> None:
    """The whole run's artifacts, estimated from the base's size, must fit where they go: one line with the
    estimate per stage and the free space, no artifact. With room, the same run prepares."""
    from qlora_pipeline.stages.contract import disk

    params = parse_params(tiny.params_for(tmp_path, tiny_llama_dir, qa_jsonl))
    source = sum(f.stat().st_size for f in tiny_llama_dir.glob("*.safetensors"))
    size = disk.estimate_run_bytes(params, source, 2)
    # 16-bit base: prepare copies it, quantize ~4.1 bits, merge bf16, 4 GGUF types + GPTQ, release 3 copies
    assert size.per_stage["prepare"] == int(source * disk.MARGIN)
    assert (
        size.per_stage["release"] == 3 * (size.per_stage["merge"] + size.per_stage["export"])
        or abs(size.per_stage["release"] - 3 * (size.per_stage["merge"] + size.per_stage["export"])) <= 3
    )
    monkeypatch.setattr(disk, "free_bytes", lambda _path: size.total - 1)
    with pytest.raises(InputError, match=r"this run writes about .* GiB under .*artifacts \(prepare .*release .* but "):
        prepare.run(params)
    assert not (tmp_path / "artifacts").exists() or not any((tmp_path / "artifacts").iterdir())
    monkeypatch.setattr(disk, "free_bytes", lambda _path: size.total)
    assert prepare.run(params).metrics["architecture"] == "LlamaForCausalLM"
