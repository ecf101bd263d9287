"""Make `qlora_pipeline` importable from this checkout when it is not pip-installed.

`make setup` installs the checkout (editable), and then this does nothing. A GPU node that runs the acceptance
script from a copied tree has no install: there it builds a scratch folder holding `qlora_pipeline/kernels`,
`/stages`, `/pipelines` as links to this checkout's folders, and puts it first on sys.path and on PYTHONPATH (for
the child processes the benches start). The files imported are the checkout's own (the links resolve to them).
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("kernels", "stages", "pipelines")


def ensure_importable() -> None:
    try:
        importlib.import_module("qlora_pipeline.stages.contract")
        return
    except ImportError:
        pass
    links = Path(tempfile.mkdtemp(prefix="qlora-checkout-")) / "qlora_pipeline"
    links.mkdir()
    for folder in FOLDERS:
        (links / folder).symlink_to(ROOT / folder, target_is_directory=True)
    sys.path.insert(0, str(links.parent))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(links.parent), os.environ.get("PYTHONPATH")]))
    importlib.invalidate_caches()
