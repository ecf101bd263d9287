"""release bundle, verify and trace on a tiny end-to-end pipeline."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from qlora_pipeline.pipelines.cli import app
from qlora_pipeline.stages import evaluate, export, merge, prepare, quantize, release, train
from qlora_pipeline.stages.contract import runtime
from qlora_pipeline.stages.contract.errors import InputError, PipelineError
from qlora_pipeline.stages.contract.params import parse_params
from tests import tiny


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("release")
    model = tiny.make_model_dir(tmp / "base", "llama", hidden_size=64, intermediate_size=128)
    data = tiny.write_jsonl(tmp / "data" / "pairs.jsonl", tiny.qa_rows(40))
    params = parse_params(tiny.whole_run_params(tmp, model, data, ["F16", "Q8_0"]))
    for stage in (prepare, quantize, train, merge, evaluate, export):
        stage.run(params)
    m = release.run(params)
    # the published copy is stable; artifacts/release only holds the latest release
    bundle = tmp / "releases" / m.metrics["release_id"]
    assert (tmp / "artifacts" / "release" / m.metrics["release_id"] / "lineage.json").exists()
    return tmp, params, m, bundle


def test_bundle_contents_lineage_and_tarball(released) -> None:
    tmp, _, _, bundle = released
    for rel in (
        "model/model.safetensors",
        "model/config.json",
        "gguf/model-F16.gguf",
        "gguf/model-Q8_0.gguf",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "report/report.html",
        "README.md",
        "lineage.json",
        "gptq/config.json",
    ):
        assert (bundle / rel).exists(), rel
    lineage = json.loads((bundle / "lineage.json").read_text())
    assert set(lineage["stages"]) == {"prepare", "quantize", "train", "merge", "evaluate", "export"}
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=runtime.REPO_ROOT, capture_output=True, text=True)
    assert lineage["code_version"]["commit"] == head.stdout.strip()
    assert lineage["files"]["gguf/model-F16.gguf"]
    with tarfile.open(tmp / "artifacts" / "release" / f"{bundle.name}.tar.gz") as tar:
        names = tar.getnames()
    assert f"{bundle.name}/lineage.json" in names and f"{bundle.name}/gguf/model-Q8_0.gguf" in names
    assert (tmp / "releases" / bundle.name / "lineage.json").exists(), "published next to earlier releases"
    card = (bundle / "README.md").read_text()
    assert "original 16-bit weights" in card and "| GGUF Q8_0 |" in card
    # the card states what 4 bits cost: the evaluate stage's QLoRA − 16-bit LoRA gap (the baseline is on: auto)
    gap = json.loads((tmp / "artifacts" / "evaluate" / "metrics.json").read_text())["qlora_minus_lora16"]
    assert f"QLoRA − 16-bit LoRA (same adapter, data order, steps and seed) = {gap:+.4f} nats" in card


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_lineage_hashes_are_the_sha256_of_the_real_bytes(released) -> None:
    """One chain, hashed here with hashlib, not with the product's hashing: served GGUF → export manifest →
    merged weights → adapter → training data file."""
    tmp, params, _, bundle = released
    lineage = json.loads((bundle / "lineage.json").read_text())
    art = tmp / "artifacts"
    gguf = _sha256(bundle / "gguf" / "model-Q8_0.gguf")
    assert lineage["files"]["gguf/model-Q8_0.gguf"] == gguf
    assert (
        lineage["stages"]["export"]["outputs"]["gguf/model-Q8_0.gguf"]
        == gguf
        == _sha256(art / "export" / "gguf" / "model-Q8_0.gguf")
    )
    merged = _sha256(art / "merge" / "model" / "model.safetensors")
    assert lineage["stages"]["merge"]["outputs"]["model/model.safetensors"] == merged
    assert lineage["files"]["model/model.safetensors"] == merged
    adapter = _sha256(art / "train" / "adapter" / "adapter_model.safetensors")
    assert lineage["stages"]["train"]["outputs"]["adapter/adapter_model.safetensors"] == adapter
    data = Path(params.data.path)
    (recorded,) = [v for k, v in lineage["stages"]["prepare"]["inputs"].items() if k.endswith(data.name)]
    assert recorded == _sha256(data)
    assert lineage["stages"]["export"] == json.loads((art / "export" / "manifest.json").read_text())


def test_verify_passes_then_fails_naming_a_tampered_byte(released, tmp_path) -> None:
    import shutil

    _, _, _, bundle = released
    copy = tmp_path / bundle.name
    shutil.copytree(bundle, copy)
    runner = CliRunner()
    ok = runner.invoke(app, ["verify", str(copy)])
    assert ok.exit_code == 0 and "match lineage.json" in ok.output
    target = copy / "gguf" / "model-Q8_0.gguf"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    bad = runner.invoke(app, ["verify", str(copy)])
    assert bad.exit_code == 1
    assert "gguf/model-Q8_0.gguf does not match lineage.json" in bad.output


@pytest.mark.parametrize("plant", ["symlink", "fifo"])
def test_verify_refuses_a_link_or_special_file_added_to_a_bundle(released, tmp_path, plant: str) -> None:
    """Before: 'OK: 27 files … match' with a symlink to /etc and a FIFO added (hash_tree skipped or followed them)."""
    import os
    import shutil

    _, _, _, bundle = released
    copy = tmp_path / bundle.name
    shutil.copytree(bundle, copy)
    if plant == "symlink":
        (copy / "gguf" / "etc").symlink_to("/etc")
    else:
        os.mkfifo(copy / "report" / "pipe")
    bad = CliRunner().invoke(app, ["verify", str(copy)])
    assert bad.exit_code == 1, bad.output
    expected = "gguf/etc is a symlink (to /etc)" if plant == "symlink" else "report/pipe is a FIFO"
    assert expected in bad.output and "holds only regular files" in bad.output, bad.output


def test_a_release_that_cannot_publish_fails_and_is_not_current_until_it_does(released, tmp_path) -> None:
    """Before: publish ran after the stage was sealed, so a failure there left a 'current' release nobody got."""
    from qlora_pipeline.stages.contract.currency import currency

    _, params, _, _ = released
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the publish folder should be")
    bad = params.model_copy(
        update={"release": params.release.model_copy(update={"publish_dir": str(blocker / "releases")})}
    )
    with pytest.raises(PipelineError, match=r"cannot publish the release to .*nothing was published"):
        release.run(bad)
    assert not currency("release", bad).current
    good = params.model_copy(
        update={"release": params.release.model_copy(update={"publish_dir": str(tmp_path / "releases")})}
    )
    m = release.run(good)
    assert (tmp_path / "releases" / m.metrics["release_id"] / "lineage.json").is_file()
    assert currency("release", good).current


def _ec_key(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private, public = tmp_path / "team-key.pem", tmp_path / "team-key.pub.pem"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private, public


def _model_signing_cli(bundle: Path, public: Path) -> subprocess.CompletedProcess:
    """OpenSSF model-signing's own CLI, independent of our code."""
    import shutil
    import sys

    cli = Path(sys.executable).parent / "model_signing"
    cmd = [str(cli) if cli.exists() else shutil.which("model_signing"), "verify", "key"]
    cmd += ["--public_key", str(public), "--signature", str(bundle / "model.sig"), str(bundle)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_a_signed_bundle_verifies_with_our_cli_and_model_signings_and_a_rewrite_does_not(released, tmp_path) -> None:
    """Before: a flipped byte plus a lineage.json updated with the new sha256 verified "OK"."""
    import shutil

    _, params, _, _ = released
    private, public = _ec_key(tmp_path)
    signed = params.model_copy(
        update={
            "release": params.release.model_copy(
                update={"signing_key": str(private), "publish_dir": str(tmp_path / "releases")}
            )
        }
    )
    m = release.run(signed)
    assert m.metrics["signed"] is True
    bundle = tmp_path / "releases" / m.metrics["release_id"]
    card = (bundle / "README.md").read_text()
    assert "model.sig` (OpenSSF model-signing), public key sha256" in card and "UNSIGNED" not in card
    statement = json.loads((bundle / "provenance.intoto.json").read_text())
    assert statement["predicateType"] == "https://slsa.dev/provenance/v1"
    subjects = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
    assert subjects["gguf/model-Q8_0.gguf"] == _sha256(bundle / "gguf" / "model-Q8_0.gguf")
    runner = CliRunner()
    ok = runner.invoke(app, ["verify", str(bundle), "--public-key", str(public)])
    assert ok.exit_code == 0 and "OK: signed by the key" in ok.output, ok.output
    assert _model_signing_cli(bundle, public).returncode == 0
    no_key = runner.invoke(app, ["verify", str(bundle)])
    assert no_key.exit_code == 1 and "no --public-key was given" in no_key.output

    rewritten = tmp_path / "rewritten"
    shutil.copytree(bundle, rewritten)
    gguf = rewritten / "gguf" / "model-Q8_0.gguf"
    data = bytearray(gguf.read_bytes())
    data[len(data) // 2] ^= 0x01
    gguf.write_bytes(bytes(data))
    lineage = json.loads((rewritten / "lineage.json").read_text())
    lineage["files"]["gguf/model-Q8_0.gguf"] = _sha256(gguf)
    (rewritten / "lineage.json").write_text(json.dumps(lineage, indent=1, sort_keys=True))
    statement = json.loads((rewritten / "provenance.intoto.json").read_text())
    for subject in statement["subject"]:
        if subject["name"] in ("gguf/model-Q8_0.gguf", "lineage.json"):
            subject["digest"]["sha256"] = _sha256(rewritten / subject["name"])
    (rewritten / "provenance.intoto.json").write_text(json.dumps(statement, indent=1, sort_keys=True))
    hashes_only = runner.invoke(app, ["verify", str(rewritten)])
    assert "no --public-key was given" in hashes_only.output, "every hash matches: only the signature can tell"
    bad = runner.invoke(app, ["verify", str(rewritten), "--public-key", str(public)])
    assert bad.exit_code == 1 and "does not verify" in bad.output, bad.output
    assert _model_signing_cli(rewritten, public).returncode != 0
    extra = tmp_path / "extra"
    shutil.copytree(bundle, extra)
    (extra / "notes.txt").write_text("added later")
    assert runner.invoke(app, ["verify", str(extra), "--public-key", str(public)]).exit_code == 1
    assert _model_signing_cli(extra, public).returncode != 0


def test_an_unsigned_release_says_so_in_its_card_and_in_verify(released) -> None:
    _, _, _, bundle = released
    assert "UNSIGNED: no release.signing_key was set" in (bundle / "README.md").read_text()
    out = CliRunner().invoke(app, ["verify", str(bundle)])
    assert out.exit_code == 0 and "UNSIGNED: this bundle carries no signature" in out.output


def test_trace_of_the_gguf_reaches_dataset_hash_and_commit(released) -> None:
    tmp, _, _, bundle = released
    out = CliRunner().invoke(app, ["trace", str(bundle / "gguf" / "model-Q8_0.gguf"), "--search", str(tmp)])
    assert out.exit_code == 0, out.output
    lineage = json.loads((bundle / "lineage.json").read_text())
    text = out.output
    assert lineage["dataset_sha256"] in text
    assert str(lineage["code_version"]["commit"]) in text
    for stage in ("export", "merge", "train", "quantize", "prepare"):
        assert f"\n{stage} " in "\n" + text, stage
    data_sha = next(v for k, v in lineage["stages"]["prepare"]["inputs"].items() if k.startswith("dataset/"))
    assert data_sha in text


def test_trace_of_an_unknown_file_fails(tmp_path) -> None:
    f = tmp_path / "x.gguf"
    f.write_bytes(b"not released")
    out = CliRunner().invoke(app, ["trace", str(f), "--search", str(tmp_path)])
    assert out.exit_code == 2 and "no release bundle lists a file" in out.output


def test_dirty_tree_is_refused_unless_allowed(released, monkeypatch) -> None:
    _, params, _, _ = released
    monkeypatch.setattr(release, "code_version", lambda: {"commit": "abc", "dirty": True})
    strict = params.model_copy(update={"release": params.release.model_copy(update={"allow_dirty": False})})
    with pytest.raises(InputError, match="uncommitted changes"):
        release.run(strict)
    m = release.run(params)
    card = (Path(params.tracking.artifacts_dir) / "release" / m.metrics["release_id"] / "README.md").read_text()
    assert "WARNING: built from a working tree with uncommitted changes" in card


def test_a_release_without_a_known_commit_is_refused_unless_allowed(released, monkeypatch, tmp_path) -> None:
    """git genuinely failing (GIT_DIR pointing nowhere, as when git is missing or refuses the checkout): no release
    with `commit: null` unless allow_dirty, and then the card says the commit is unknown."""
    _, params, _, _ = released
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "no-such-git-dir"))
    strict = params.model_copy(update={"release": params.release.model_copy(update={"allow_dirty": False})})
    with pytest.raises(InputError, match=r"cannot tell which commit built this release: git is missing or refuses"):
        release.run(strict)
    m = release.run(params)
    card = (Path(params.tracking.artifacts_dir) / "release" / m.metrics["release_id"] / "README.md").read_text()
    assert "WARNING: the code commit is unknown" in card


def test_release_is_a_registered_model_version_with_sha256_tags(released) -> None:
    from mlflow.tracking import MlflowClient

    _, params, m, bundle = released
    client = MlflowClient(params.tracking.mlflow_uri)
    info = release.ReleaseRecord.of(m).mlflow_model
    version = client.get_model_version(params.release.name, info["version"])
    assert version.tags["release_id"] == bundle.name
    logged = client.get_logged_model(info["model_id"])
    lineage = json.loads((bundle / "lineage.json").read_text())
    assert logged.tags["sha256.gguf/model-Q8_0.gguf"] == lineage["files"]["gguf/model-Q8_0.gguf"]
    assert logged.source_run_id == m.mlflow_run_id


def test_mlflow_runs_hold_the_loss_curve_and_the_report(released) -> None:
    from mlflow.tracking import MlflowClient

    tmp, params, _, _ = released
    client = MlflowClient(params.tracking.mlflow_uri)
    for stage, name in (("train", "loss_curve.png"), ("evaluate", "report.html")):
        manifest = json.loads((tmp / "artifacts" / stage / "manifest.json").read_text())
        run_id = manifest["mlflow_run_id"]
        assert name in [a.path for a in client.list_artifacts(run_id)], stage
        assert client.get_run(run_id).data.metrics["memory.peak_rss_mb"] > 0


def test_second_release_lands_next_to_the_first_with_dvc_lock_in_its_lineage(released, tmp_path, monkeypatch) -> None:
    """README: "Each run that reaches `release` adds a new bundle next to the earlier ones" and lineage.json holds
    "the `dvc.lock` of the run"."""
    tmp, params, first, first_bundle = released
    before = {p.name for p in (tmp / "releases").iterdir()}
    first_files = json.loads((first_bundle / "lineage.json").read_text())["files"]
    project = tmp_path / "checkout"
    project.mkdir()
    lock = "schema: '2.0'\nstages:\n  prepare:\n    cmd: sh pipelines/dvc_stage.sh prepare\n"
    (project / "dvc.lock").write_text(lock)
    monkeypatch.setattr(release, "REPO_ROOT", project)
    time.sleep(1.1)  # release ids carry the UTC second: two releases of the same parents need distinct seconds
    second = release.run(params)
    bundle = tmp / "releases" / second.metrics["release_id"]
    assert second.metrics["release_id"] != first.metrics["release_id"]
    assert {p.name for p in (tmp / "releases").iterdir()} == before | {bundle.name}
    lineage = json.loads((bundle / "lineage.json").read_text())
    assert lineage["dvc_lock"] == lock
    assert lineage["dvc_lock_sha256"] == hashlib.sha256(lock.encode()).hexdigest()
    for rel, digest in first_files.items():  # the earlier bundle is untouched
        assert _sha256(first_bundle / rel) == digest, rel


def test_a_stage_goes_stale_on_the_code_it_imports_and_the_fields_it_reads_only(released, tmp_path, monkeypatch):
    """The currency rule the flow, `qlora status` and dvc.yaml share: a field only evaluate reads leaves train
    current; an edit to kernels/fused_ce.py (reached by export, train and evaluate through the held-out loss)
    makes exactly those stale."""
    from qlora_pipeline.stages.contract import codedeps
    from qlora_pipeline.stages.contract.currency import currency
    from qlora_pipeline.stages.contract.registry import ORDER

    _, params, _, _ = released
    assert {s: currency(s, params).reason for s in ORDER} == dict.fromkeys(ORDER, "")
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    status = CliRunner().invoke(app, ["status", "--params", str(params_file)])
    assert status.exit_code == 0 and status.output.split() == [w for s in ORDER for w in (s, "current")]

    e = params.evaluate
    more_generations = params.model_copy(
        update={"evaluate": e.model_copy(update={"num_generations": e.num_generations + 1})}
    )
    state = {s: currency(s, more_generations) for s in ORDER}
    assert state["evaluate"].reason == "params changed"
    assert [s for s in ORDER if not state[s].current] == ["evaluate"], "train, export and release never read it"

    source = tmp_path / "source"
    for folder in codedeps.FOLDERS:
        shutil.copytree(runtime.REPO_ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(codedeps, "SOURCE_ROOT", source)
    assert [s for s in ORDER if not currency(s, params).current] == [], "an identical copy of the code"
    fused_ce = source / "kernels" / "fused_ce.py"
    fused_ce.write_text(fused_ce.read_text() + "\n# edited\n")
    state = {s: currency(s, params) for s in ORDER}
    assert [s for s in ORDER if not state[s].current] == ["train", "evaluate", "export"]
    assert state["export"].reason == "code changed"


def test_the_bundle_names_the_base_model_by_content_not_by_a_training_machine_path(released) -> None:
    tmp, _, _, bundle = released
    adapter_cfg = json.loads((bundle / "adapter" / "adapter_config.json").read_text())
    weights = {
        f"base_model/{p.name}": _sha256(p)
        for p in sorted((tmp / "artifacts" / "prepare" / "model").glob("*.safetensors"))
    }
    expected = (
        "sha256:" + hashlib.sha256(json.dumps(weights, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    )
    assert adapter_cfg["base_model_name_or_path"] == expected
    assert str(tmp) not in (bundle / "adapter" / "adapter_config.json").read_text()
    assert f"`{expected}`" in (bundle / "README.md").read_text()


def _parse_modelfile(text: str) -> dict[str, list[str]]:
    """Ollama's Modelfile grammar, for what we write: `INSTRUCTION value`, values as JSON strings or in triple
    quotes; `PARAMETER name value` is keyed `PARAMETER name`."""
    out: dict[str, list[str]] = {}
    rest = text
    while rest.strip():
        head, _, rest = rest.lstrip("\n").partition(" ")
        if head == "PARAMETER":
            name, _, rest = rest.partition(" ")
            head = f"PARAMETER {name}"
        if rest.startswith('"""'):
            value, _, rest = rest[3:].partition('"""')
        else:
            line, _, rest = rest.partition("\n")
            value = json.loads(line) if line.startswith('"') else line
        out.setdefault(head, []).append(value)
    return out


def _render_go_messages(template: str, messages: list[dict[str, str]]) -> str:
    """The subset of Go templates our Modelfiles use: one `{{- range .Messages }}…{{ end }}` with .Role/.Content."""
    head = "{{- range .Messages }}"
    assert template.startswith(head)
    body, _, tail = template[len(head) :].partition("{{ end }}")
    parts = [body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"]) for m in messages]
    return "".join(parts) + tail


def test_the_bundle_has_an_ollama_modelfile_that_prompts_as_the_chat_template_does(released) -> None:
    from transformers import AutoTokenizer

    _, _, _, bundle = released
    spec = _parse_modelfile((bundle / "Modelfile").read_text())
    assert spec["FROM"] == ["./gguf/model-Q8_0.gguf"] and (bundle / "gguf" / "model-Q8_0.gguf").is_file()
    assert "<|im_end|>" in spec["PARAMETER stop"]
    tok = AutoTokenizer.from_pretrained(bundle / "model")
    user = [{"role": "user", "content": "What is the capital of France?"}]
    expected = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    (system,) = spec["SYSTEM"]  # the template's own default system prompt, since data.system_prompt is unset
    assert system == "You are a tiny test assistant"
    assert _render_go_messages(spec["TEMPLATE"][0], [{"role": "system", "content": system}, *user]) == expected


def test_the_bundle_has_the_adapter_alone_as_a_gguf_lora_file(released) -> None:
    """Next to the GGUF models: the trained adapter as a llama.cpp LoRA file (what llama.cpp computes with it is
    checked in test_gguf_lora.py), one lora_a/lora_b pair per adapted linear, listed in the lineage."""
    from gguf import GGUFReader

    from qlora_pipeline.kernels.formats.peft_adapter import read_adapter_config

    _, _, _, bundle = released
    path = bundle / "gguf" / "lora-adapter.gguf"
    reader = GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    config = read_adapter_config(bundle / "adapter")
    assert fields["adapter.lora.alpha"] == pytest.approx(config.scaling * config.r)
    names = {t.name for t in reader.tensors}
    peft = json.loads((bundle / "adapter" / "adapter_config.json").read_text())
    assert names and all(n.endswith((".lora_a", ".lora_b")) for n in names)
    assert len(names) == 2 * len({n.rsplit(".", 1)[0] for n in names}) and peft["r"] == config.r
    assert "gguf/lora-adapter.gguf" in json.loads((bundle / "lineage.json").read_text())["files"]
