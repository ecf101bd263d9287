#!/bin/sh
# dvc.yaml's stage command. DVC runs it through the shell with the PATH it was started with, so `.venv/bin/dvc repro`
# without an activated venv would find the system python (no torch). Use, in order: $QLORA_PYTHON, the checkout's
# .venv, then python3 on the PATH (an activated conda env or system install).
root=$(cd "$(dirname "$0")/.." && pwd)
py=${QLORA_PYTHON:-$root/.venv/bin/python}
[ -x "$py" ] || py=python3
exec "$py" -m qlora_pipeline.pipelines.cli stage "$1"
