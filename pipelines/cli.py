"""`qlora` command line: run the whole pipeline (Prefect flow) or one stage, validate params."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from qlora_pipeline.stages.contract.device import bound_cpu_kernel_caches
from qlora_pipeline.stages.contract.errors import PipelineError
from qlora_pipeline.stages.contract.host_allocator import run_on_host_allocator
from qlora_pipeline.stages.contract.host_heap import bound_host_heap
from qlora_pipeline.stages.contract.params import load_params
from qlora_pipeline.stages.contract.registry import ORDER, load_stage

app = typer.Typer(add_completion=False, no_args_is_help=True, help="QLoRA pipeline: prepare → quantize → train → …")

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params.yaml to use")]


def _fail(exc: PipelineError) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(2)


@app.command()
def run(
    params: ParamsOpt = Path("params.yaml"),
    stage: Annotated[list[str] | None, typer.Option("--stage", "-s", help="run only these stages")] = None,
    force: Annotated[bool, typer.Option(help="re-run stages even if up to date")] = False,
) -> None:
    """Run the pipeline as the Prefect flow `qlora_pipeline` (unchanged stages are skipped)."""
    from rich.console import Console
    from rich.table import Table

    try:
        p = load_params(params)  # fail fast, before Prefect starts its server
        for s in stage or []:
            if s not in ORDER:
                raise PipelineError(f"unknown stage '{s}'; stages: {', '.join(ORDER)}")
        from qlora_pipeline.stages.contract.preflight import preflight_run

        preflight_run(p, list(stage or ORDER))
        from qlora_pipeline.pipelines.flow import results_summary, run_pipeline

        results = run_pipeline(params, stages=stage, force=force)
    except PipelineError as exc:
        _fail(exc)
        return
    table = Table(title="qlora_pipeline")
    for col in ("stage", "artifact created", "wall s", "peak RSS MiB"):
        table.add_column(col)
    for name, created, wall, rss in results_summary(results):
        table.add_row(name, created, f"{wall:.1f}", f"{rss:.0f}")
    Console().print(table)


@app.command("stage")
def stage_cmd(
    name: Annotated[str, typer.Argument(help=f"one of: {', '.join(ORDER)}")],
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Run one stage directly (the same function DVC and the flow call)."""
    if name not in ORDER:
        _fail(PipelineError(f"unknown stage '{name}'; stages: {', '.join(ORDER)}"))
    try:
        p = load_params(params)
        manifest = load_stage(name).run(p)
    except PipelineError as exc:
        _fail(exc)
        return
    typer.echo(
        f"{name}: done in {manifest.timings.get('wall_s', 0):.1f} s, "
        f"peak RSS {manifest.memory.get('peak_rss_mb', 0):.0f} MiB"
    )


@app.command()
def status(params: ParamsOpt = Path("params.yaml")) -> None:
    """Say, per stage, whether its artifact is current or why it is stale (the rule the flow skips stages by)."""
    from qlora_pipeline.stages.contract.currency import currency

    try:
        p = load_params(params)
    except PipelineError as exc:
        _fail(exc)
        return
    for name in ORDER:
        state = currency(name, p)
        typer.echo(f"{name:<9} {'current' if state.current else 'stale: ' + state.reason}")


@app.command()
def verify(
    bundle: Annotated[Path, typer.Argument(help="a release bundle directory")],
    public_key: Annotated[
        Path | None, typer.Option(help="the team's public key (PEM): check the bundle's model-signing signature")
    ] = None,
) -> None:
    """Check a release bundle: no links or special files, every file's sha256 against lineage.json and the
    provenance, and with --public-key its signature (exactly these files, signed by that key). Exit 1 naming the
    first problem."""
    from qlora_pipeline.stages.contract.lineage import verify_bundle
    from qlora_pipeline.stages.contract.signing import SIGNATURE, verify_signature

    try:
        result = verify_bundle(bundle)
        if public_key is not None:
            verify_signature(bundle, public_key)
        elif result["signed"]:
            raise PipelineError(
                f"{bundle} is signed ({SIGNATURE}) but no --public-key was given: pass the team's public key; "
                "without it nothing shows the bundle was not rewritten"
            )
    except PipelineError as exc:
        typer.echo(f"FAILED: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"OK: {result['files']} files in {bundle} match lineage.json")
    if public_key is not None:
        typer.echo(f"OK: signed by the key of {public_key}; no file added, removed or changed since")
    else:
        typer.echo(
            "UNSIGNED: this bundle carries no signature, so matching hashes do not show it was not rewritten "
            "(set release.signing_key to sign releases)"
        )


@app.command()
def trace(
    file: Annotated[Path, typer.Argument(help="any served file (a GGUF, a GPTQ or merged safetensors, …)")],
    search: Annotated[list[Path] | None, typer.Option(help="where to look for bundles")] = None,
) -> None:
    """Print the chain behind a served file: export, merge, adapter, training run, base, dataset, params, commit."""
    from qlora_pipeline.stages.contract.lineage import find_bundle_of, trace_chain
    from qlora_pipeline.stages.contract.runtime import REPO_ROOT

    if not file.exists():
        _fail(PipelineError(f"{file} does not exist"))
    roots = search or [REPO_ROOT / "releases", REPO_ROOT / "artifacts" / "release"]
    try:
        bundle, rel = find_bundle_of(file, roots)
    except PipelineError as exc:
        _fail(exc)
        return
    for line in trace_chain(bundle, rel):
        typer.echo(line)


@app.command("deploy")
def deploy_cmd(
    pool: Annotated[str, typer.Option(help="work pool of the GPU node's worker")] = "gpu-node",
    cron: Annotated[str, typer.Option(help="retraining schedule (cron, in --timezone)")] = "0 2 * * 1",
    name: Annotated[str, typer.Option(help="deployment name")] = "scheduled-retrain",
    params: ParamsOpt = Path("params.yaml"),
    timezone: Annotated[str, typer.Option()] = "UTC",
    cpu_pool: Annotated[
        str | None, typer.Option(help="run the CPU stages on this pool; train, evaluate, export on --pool")
    ] = None,
) -> None:
    """Register the scheduled retraining deployment on a running Prefect server (PREFECT_API_URL)."""
    try:
        load_params(params)
    except PipelineError as exc:
        _fail(exc)
    from qlora_pipeline.pipelines.deploy import deploy

    deployment_id = deploy(
        pool=pool, cron=cron, name=name, params_path=str(params), timezone=timezone, cpu_pool=cpu_pool
    )
    home = cpu_pool or pool
    typer.echo(f"deployment qlora_pipeline/{name} ({deployment_id}) on pool {home}, schedule '{cron}' {timezone}")
    if cpu_pool:
        typer.echo(f"train, evaluate and export: qlora_stage/{name}-gpu on pool {pool} (shared artifacts folder)")
        typer.echo(f"on a CPU node: .venv/bin/prefect worker start --pool {cpu_pool}")
    typer.echo(f"on the GPU node, from this checkout: .venv/bin/prefect worker start --pool {pool}")


@app.command("plan")
def plan_cmd(
    params: ParamsOpt = Path("params.yaml"),
    gpu_memory: Annotated[str, typer.Option(help="GiB of the GPU to plan for, or auto: this node's GPU 0")] = "auto",
    host_memory: Annotated[str, typer.Option(help="GiB of host RAM to plan for, or auto: this machine's")] = "auto",
    model_config: Annotated[
        Path | None, typer.Option(help="plan for this config.json instead of the params' base model")
    ] = None,
) -> None:
    """Predict a train step's peak GPU memory and each stage's peak host memory, say whether they fit, and which
    change makes the train step fit."""
    import json

    from qlora_pipeline.stages.contract.host_plan import host_plan
    from qlora_pipeline.stages.contract.memory_fit import gib, usable_bytes
    from qlora_pipeline.stages.contract.memory_plan import ModelShape, plan_train, train_shape

    model_dir = None
    try:
        p = load_params(params)
        capacity, ram = _gpu_capacity(gpu_memory), _host_capacity(host_memory)
        if model_config is None:
            from qlora_pipeline.stages.lm.modelio import base_model_dir

            model_dir = base_model_dir(p.model)
            model_config = model_dir / "config.json"
        try:
            config = json.loads(model_config.read_text())
            shape = ModelShape.from_config(config)
        except (OSError, ValueError) as exc:
            raise PipelineError(f"cannot read a supported config.json at {model_config} ({exc})") from None
    except PipelineError as exc:
        _fail(exc)
        return
    t = train_shape(p, config)
    plan = plan_train(shape, t)
    where = f", on each of {t.ranks} GPUs ({'FSDP2-sharded' if t.sharded else 'replicated'})" if t.ranks > 1 else ""
    typer.echo(f"train step on {config.get('architectures', ['?'])[0]}, {t.batch_size} x {t.max_length} tokens{where}:")
    for name, value in plan.as_dict().items():
        if isinstance(value, int) and value:
            typer.echo(f"  {name:<15} {gib(value):8.2f} GiB")
    typer.echo(f"  (peak in the {plan.phase} pass)")
    host = host_plan(p, config, model_dir, "cuda")
    over = {stage: peak for stage, peak in host.items() if peak > ram}
    typer.echo(f"host memory per stage on the GPU node (of {gib(ram):.1f} GiB RAM):")
    typer.echo("  " + ", ".join(f"{stage} {gib(peak):.1f}" for stage, peak in host.items()) + " GiB")
    if over:
        typer.echo(f"  does not fit the host: {', '.join(over)}")
    usable = usable_bytes(capacity)
    if plan.device_peak <= usable:
        typer.echo(f"fits: {gib(plan.device_peak):.1f} of {gib(usable):.1f} usable GiB ({gib(capacity):.1f} GiB GPU)")
        if over:
            raise typer.Exit(1)
        return
    _print_fixes(shape, t, plan, capacity)
    raise typer.Exit(1)


def _print_fixes(shape: Any, t: Any, plan: Any, capacity: int) -> None:
    from qlora_pipeline.stages.contract.memory_fit import fitting_changes, gib, usable_bytes

    usable = usable_bytes(capacity)
    typer.echo(f"does not fit: {gib(plan.device_peak):.1f} GiB > {gib(usable):.1f} usable of {gib(capacity):.1f} GiB")
    changes = fitting_changes(shape, t, capacity)
    for change, fixed in changes[:3]:
        typer.echo(f"  fits with {change}: {gib(fixed.device_peak):.1f} GiB")
    if not changes:
        typer.echo("  no single setting fits: use a GPU with more memory")


def _gib_option(spec: str, option: str) -> int | None:
    """`--<option> GIB` in bytes; None for auto."""
    if spec == "auto":
        return None
    try:
        return int(float(spec) * 2**30)
    except ValueError:
        raise PipelineError(f"--{option} {spec!r} is not a number of GiB or auto") from None


def _host_capacity(spec: str) -> int:
    import os

    given = _gib_option(spec, "host-memory")
    return given if given is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _gpu_capacity(spec: str) -> int:
    given = _gib_option(spec, "gpu-memory")
    if given is not None:
        return given
    import torch

    if not torch.cuda.is_available():
        raise PipelineError("no GPU on this machine: give the GPU's size with --gpu-memory GIB (e.g. 48)")
    return torch.cuda.get_device_properties(0).total_memory


@app.command("check-params")
def check_params(params: ParamsOpt = Path("params.yaml")) -> None:
    """Validate params.yaml and exit."""
    try:
        load_params(params)
    except PipelineError as exc:
        _fail(exc)
    typer.echo(f"{params}: ok")


def main() -> None:
    try:
        run_on_host_allocator()  # first: it may re-execute this command with mimalloc preloaded
    except PipelineError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
    bound_cpu_kernel_caches()
    bound_host_heap()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "httpcore", "alembic", "mlflow.store.db.utils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    app()


if __name__ == "__main__":
    main()
