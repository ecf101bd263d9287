"""MLflow tracking: one run per pipeline run, one nested run per stage; offline, no telemetry.

Tracking must never break a stage: if MLflow fails, the stage still completes and the failure is logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qlora_pipeline.stages.contract.params import TrackingParams
from qlora_pipeline.stages.contract.runtime import REPO_ROOT

log = logging.getLogger(__name__)

"""Set by the pipeline flow so stage runs nest under it even when Prefect runs them in another thread."""

OFFLINE_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def set_offline_env() -> None:
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)


def resolve_uri(uri: str) -> str:
    """Make a relative sqlite path absolute against the repo root, so runs land in one DB from any cwd."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str((REPO_ROOT / uri[len(prefix) :]).resolve())
    return uri


def artifact_location(uri: str) -> str:
    """A fixed artifact folder beside the sqlite DB (MLflow's default is relative to the cwd)."""
    prefix = "sqlite:///"
    base = Path(uri[len(prefix) :]).parent if uri.startswith(prefix) else REPO_ROOT
    return (base / "mlartifacts").resolve().as_uri()


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class Tracker:
    """Thin wrapper: a no-op when disabled, and never raises into the stage."""

    def __init__(self, params: TrackingParams) -> None:
        self.enabled = params.mlflow
        self.params = params
        self._mlflow: Any = None
        if self.enabled:
            try:
                set_offline_env()
                import mlflow

                uri = resolve_uri(params.mlflow_uri)
                mlflow.set_tracking_uri(uri)
                if mlflow.get_experiment_by_name(params.experiment) is None:
                    mlflow.create_experiment(params.experiment, artifact_location=artifact_location(uri))
                mlflow.set_experiment(params.experiment)
                self._mlflow = mlflow
            except Exception as exc:  # tracking is best-effort by design
                log.warning("MLflow disabled for this run: %s", exc)
                self.enabled = False

    @contextlib.contextmanager
    def run(
        self, name: str, tags: dict[str, str] | None = None, parent_run_id: str | None = None
    ) -> Iterator[str | None]:
        """Start a run, nested under the active one or under `parent_run_id` (the pipeline's run, which the flow
        passes down); yields the run id (None when disabled)."""
        if not self.enabled:
            yield None
            return
        mlflow = self._mlflow
        parent = parent_run_id if mlflow.active_run() is None else None
        nested = mlflow.active_run() is not None or bool(parent)
        with mlflow.start_run(run_name=name, nested=nested, parent_run_id=parent or None, tags=tags or {}) as run:
            yield run.info.run_id

    def current_run_id(self) -> str | None:
        if not self.enabled:
            return None
        run = self._mlflow.active_run()
        return run.info.run_id if run else None

    def log_params(self, params: dict[str, Any]) -> None:
        self._safe(lambda m: m.log_params({k: str(v)[:6000] for k, v in flatten(params).items()}))

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        numeric = {
            k: float(v) for k, v in flatten(metrics).items() if isinstance(v, int | float) and not isinstance(v, bool)
        }
        if numeric:
            self._safe(lambda m: m.log_metrics(numeric, step=step))

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._safe(lambda m: m.set_tags({k: str(v)[:8000] for k, v in tags.items()}))

    def log_artifact(self, path: Path) -> None:
        self._safe(lambda m: m.log_artifact(str(path)))

    def register_external_model(
        self, name: str, run_id: str | None, tags: dict[str, str], params: dict[str, str]
    ) -> dict[str, Any] | None:
        """Register files kept outside MLflow (the release bundle) as a model version linked to `run_id`."""
        if not self.enabled:
            return None
        try:
            mlflow = self._mlflow
            logged = mlflow.create_external_model(
                name=name,
                source_run_id=run_id,
                tags={k[:250]: str(v)[:8000] for k, v in tags.items()},
                params={k[:250]: str(v)[:6000] for k, v in params.items()},
                model_type="qlora-release",
            )
            version = mlflow.register_model(
                f"models:/{logged.model_id}", name, tags={"release_id": tags.get("release_id", "")}
            )
            return {"model_id": logged.model_id, "registered_name": name, "version": str(version.version)}
        except Exception as exc:
            log.warning("MLflow model registration failed: %s", exc)
            return None

    def _safe(self, fn: Any) -> None:
        if not self.enabled:
            return
        try:
            fn(self._mlflow)
        except Exception as exc:
            log.warning("MLflow logging failed: %s", exc)
