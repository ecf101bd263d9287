"""Scheduled retraining through a real local Prefect server and process worker (loopback only, bounded)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

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


def test_deployment_runs_through_server_and_worker(tmp_path, tiny_llama_dir, qa_jsonl) -> None:
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
    raw = tiny.params_for(tmp_path, tiny_llama_dir, qa_jsonl)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed in finally
    server = subprocess.Popen(
        [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    worker = None
    try:
        _wait_healthy(api, server, 180)
        deploy = subprocess.run(
            [
                sys.executable,
                "-c",
                "from qlora_pipeline.pipelines.deploy import deploy; "
                f"print(deploy(pool='test-gpu-node', cron='0 2 * * 1', name='test-retrain', "
                f"params_path={str(params_file)!r}, stages=['prepare', 'quantize']))",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert deploy.returncode == 0, deploy.stderr[-3000:]
        trigger = subprocess.run(
            [
                sys.executable,
                "-c",
                "from prefect.deployments import run_deployment; "
                "r = run_deployment('qlora_pipeline/test-retrain', timeout=0); print(r.id)",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert trigger.returncode == 0, trigger.stderr[-3000:]
        run_id = trigger.stdout.strip().splitlines()[-1]
        worker = subprocess.Popen(
            [*PREFECT, "worker", "start", "--pool", "test-gpu-node", "--type", "process"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        state = _wait_for_run(run_id, env, timeout=420)
        assert state == "COMPLETED", (tmp_path / "server.log").read_text()[-4000:]
        assert (tmp_path / "artifacts" / "quantize" / "manifest.json").exists()
        schedules = subprocess.run(
            [
                sys.executable,
                "-c",
                "from prefect.client.orchestration import get_client\n"
                "with get_client(sync_client=True) as c:\n"
                "    d = c.read_deployment_by_name('qlora_pipeline/test-retrain')\n"
                "    print([s.schedule.cron for s in d.schedules], d.work_pool_name)",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "['0 2 * * 1'] test-gpu-node" in schedules.stdout, schedules.stderr[-2000:]
    finally:
        for proc in (worker, server):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, 15)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
        log.close()


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
