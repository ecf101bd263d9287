"""`qlora` command line: run the whole pipeline (Prefect flow) or one stage, validate params."""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from stages.common.errors import PipelineError
from stages.common.params import load_params
from stages.common.registry import ORDER

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
        load_params(params)  # fail fast, before Prefect starts its server
        for s in stage or []:
            if s not in ORDER:
                raise PipelineError(f"unknown stage '{s}'; stages: {', '.join(ORDER)}")
        from pipelines.flow import results_summary, run_pipeline

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
        manifest = importlib.import_module(f"stages.{name}").run(p)
    except PipelineError as exc:
        _fail(exc)
        return
    typer.echo(
        f"{name}: done in {manifest.timings.get('wall_s', 0):.1f} s, "
        f"peak RSS {manifest.memory.get('peak_rss_mb', 0):.0f} MiB"
    )


@app.command("check-params")
def check_params(params: ParamsOpt = Path("params.yaml")) -> None:
    """Validate params.yaml and exit."""
    try:
        load_params(params)
    except PipelineError as exc:
        _fail(exc)
    typer.echo(f"{params}: ok")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "httpcore", "alembic", "mlflow.store.db.utils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    app()


if __name__ == "__main__":
    main()
