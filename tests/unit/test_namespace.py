"""Our folders live under `qlora_pipeline.*`: nothing of ours shadows another distribution's top-level package.

Hugging Face's kernel hub installs a top-level `kernels`; transformers (`is_kernels_available`, hub_kernels.py)
and bitsandbytes (`from kernels import get_kernel` on CPUs with AVX512-BF16) probe for it. The checks run in a
child process started from the repository root, where the current directory comes first on sys.path (as under
`python -m pytest` or `python -m qlora_pipeline...`), with a stand-in hub package installed after it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from transformers.utils import import_utils

REPO = Path(__file__).resolve().parents[2]
FOLDERS = ("kernels", "stages", "pipelines")

PROBE = """
import importlib.util, json, sys
import qlora_pipeline.stages.train, qlora_pipeline.kernels.nf4, qlora_pipeline.pipelines.cli  # the product is loaded
from transformers.utils import import_utils
out = {"available": list(import_utils._is_package_available("kernels", return_version=True))}
out["hub"] = import_utils.is_kernels_available()
spec = importlib.util.find_spec("kernels")
out["spec_file"] = None if spec is None else spec.origin
try:
    from kernels import get_kernel  # bitsandbytes' probe, word for word
    out["get_kernel"] = get_kernel("kernels-community/quantization-bitsandbytes", version=1).gemm_4bit_forward
except ImportError as exc:
    out["get_kernel"] = f"ImportError: {exc}"
print(json.dumps(out))
"""


HUB_VERSION = import_utils.KERNELS_MIN_VERSION
"""The stand-in's version: the oldest the installed transformers takes (0.18.2 for 5.23, 0.16.0 for 5.17)."""


def _fake_hub(root: Path) -> Path:
    """A stand-in for Hugging Face's `kernels` distribution: a regular package and its dist-info."""
    pkg = root / "kernels"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        f"import types\n__version__ = '{HUB_VERSION}'\n"
        "def get_kernel(repo_id, version=None):\n"
        "    return types.SimpleNamespace(gemm_4bit_forward='hub kernel')\n"
    )
    info = root / f"kernels-{HUB_VERSION}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kernels\nVersion: {HUB_VERSION}\n")
    (info / "top_level.txt").write_text("kernels\n")
    return root


def _probe(cwd: Path, extra_path: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_hub_kernels_package_wins_over_our_folder_from_the_repo_root(tmp_path: Path) -> None:
    site = _fake_hub(tmp_path / "site")
    out = _probe(REPO, extra_path=site)
    assert out["spec_file"] == str(site / "kernels" / "__init__.py")
    assert out["get_kernel"] == "hub kernel", "bitsandbytes' probe reached our folder instead of the hub package"
    assert out["available"] == [True, HUB_VERSION] and out["hub"] is True


def test_without_the_hub_package_nobody_sees_a_kernels_package(tmp_path: Path) -> None:
    for cwd in (REPO, tmp_path):  # from the repo root and from anywhere (the installed entry points)
        out = _probe(cwd)
        assert out["available"][0] is False, f"transformers sees our code as `kernels` {out['available']} from {cwd}"
        assert out["hub"] is False
        assert out["get_kernel"].startswith("ImportError")
    assert _probe(tmp_path)["spec_file"] is None


def test_the_three_folders_are_namespace_portions_and_every_subpackage_is_installed() -> None:
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert tool["package-dir"] == {f"qlora_pipeline.{f}": f for f in FOLDERS}
    on_disk = set()
    for folder in FOLDERS:
        assert not (REPO / folder / "__init__.py").exists(), f"{folder}/__init__.py would shadow a real `{folder}`"
        for py in (REPO / folder).rglob("*.py"):
            if "__pycache__" not in py.parts:
                on_disk.add("qlora_pipeline." + ".".join(py.parent.relative_to(REPO).parts))
    assert set(tool["packages"]) == on_disk
