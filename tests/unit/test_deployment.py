"""Scheduled retraining through a real local Prefect server and process worker (loopback only, bounded)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import tiny

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
PREFECT = [sys.executable, "-m", "prefect"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"prefect server at {url} not healthy after {timeout} s")


@contextlib.contextmanager
def prefect_server(tmp_path: Path) -> Iterator[tuple[dict[str, str], Any]]:
    """A real Prefect server on a free loopback port; yields its environment and the log that workers share. The
    server and every process started with `start_new_session` through `spawn` are stopped on exit."""
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "true",
        "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "results"),
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed in finally
    procs = [
        subprocess.Popen(
            [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    ]
    try:
        _wait_healthy(api, procs[0], 180)
        yield (
            env,
            lambda cmd: procs.append(
                subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            ),
        )
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
        log.close()


def _python(code: str, env: dict[str, str], timeout: float = 180) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def _trigger(deployment: str, env: dict[str, str]) -> str:
    code = f"from prefect.deployments import run_deployment; print(run_deployment({deployment!r}, timeout=0).id)"
    return _python(code, env, 120).splitlines()[-1]


def _deploy(env: dict[str, str], **kwargs: object) -> str:
    """`pipelines.deploy.deploy(**kwargs)` in a process of its own, against the server of `env`."""
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return _python(f"from qlora_pipeline.pipelines.deploy import deploy; print(deploy({args}))", env)


def _write_params(tmp_path: Path, raw: dict[str, Any]) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _worker(pool: str) -> list[str]:
    return [*PREFECT, "worker", "start", "--pool", pool, "--type", "process"]


def test_device_stages_run_on_the_gpu_pool_and_the_rest_on_the_cpu_pool(tmp_path, tiny_llama_dir, qa_jsonl) -> None:
    """`deploy(pool=gpu, cpu_pool=cpu, cron=...)` on a real server: the pipeline's deployment carries the weekly
    schedule on the CPU pool; its flow run is on the CPU pool's worker, prepare and quantize run inside it, and
    train runs as a `qlora_stage` flow run on the GPU pool's worker, into the same artifacts. (One test for both
    the schedule and the split: each server, worker and flow run costs a minute on a 2-core machine.)"""
    train = {"max_steps": 3, "batch_size": 4}
    params_file = _write_params(tmp_path, tiny.params_for(tmp_path, tiny_llama_dir, qa_jsonl, train=train))
    with prefect_server(tmp_path) as (env, spawn):
        stages = ["prepare", "quantize", "train"]
        _deploy(
            env,
            pool="gpu-pool",
            cpu_pool="cpu-pool",
            cron="0 2 * * 1",
            name="split",
            params_path=params_file,
            stages=stages,
        )
        schedules = _python(
            "from prefect.client.orchestration import get_client\n"
            "with get_client(sync_client=True) as c:\n"
            "    d = c.read_deployment_by_name('qlora_pipeline/split')\n"
            "    g = c.read_deployment_by_name('qlora_stage/split-gpu')\n"
            "    print([s.schedule.cron for s in d.schedules], d.work_pool_name, g.work_pool_name)",
            env,
            60,
        )
        assert "['0 2 * * 1'] cpu-pool gpu-pool" in schedules, schedules
        run_id = _trigger("qlora_pipeline/split", env)
        spawn(_worker("cpu-pool"))
        spawn(_worker("gpu-pool"))
        state = _wait_for_run(run_id, env, timeout=600)
        assert state == "COMPLETED", (tmp_path / "server.log").read_text()[-4000:]
        runs = _python(
            "import json\n"
            "from prefect.client.orchestration import get_client\n"
            "from prefect.client.schemas.sorting import FlowRunSort\n"
            "with get_client(sync_client=True) as c:\n"
            "    runs = c.read_flow_runs(limit=50, sort=FlowRunSort.ID_DESC)\n"
            "    print(json.dumps([[c.read_flow(r.flow_id).name, r.work_pool_name, r.parameters.get('stage'),"
            " r.state.type.value] for r in runs]))",
            env,
            60,
        )
        seen = sorted(map(tuple, json.loads(runs.splitlines()[-1])), key=str)
        assert seen == sorted(
            [("qlora_pipeline", "cpu-pool", None, "COMPLETED"), ("qlora_stage", "gpu-pool", "train", "COMPLETED")],
            key=str,
        ), seen
    for stage in ("prepare", "quantize", "train"):
        assert (tmp_path / "artifacts" / stage / "manifest.json").exists(), stage


def _wait_for_run(run_id: str, env: dict[str, str], timeout: float) -> str:
    code = (
        "import sys, time\n"
        "from prefect.client.orchestration import get_client\n"
        f"deadline = time.monotonic() + {timeout}\n"
        "with get_client(sync_client=True) as c:\n"
        "    while time.monotonic() < deadline:\n"
        f"        s = c.read_flow_run('{run_id}').state\n"
        "        if s is not None and s.is_final():\n"
        "            print(s.type.value); sys.exit(0)\n"
        "        time.sleep(2)\n"
        "print('TIMEOUT')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout + 60)
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-2000:]
