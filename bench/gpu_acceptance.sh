#!/usr/bin/env bash
# GPU acceptance in one call: kernels vs references, the pipeline's compute stages on the device, the training bench
# vs transformers+bitsandbytes+peft on SmolLM2 and an 8B-shaped model, NF4 dequant bandwidth. Writes
# bench/results/gpu-*.json; the steps are described in bench/gpu_acceptance.py.
#
#   bash bench/gpu_acceptance.sh                     # on a GPU node, from the repository root
#   bash bench/gpu_acceptance.sh --device cpu        # dry run of every step on a CPU (also the CPU reference)
#
# On an air-gapped node whose Python lacks the project's packages, prepare a carry folder here with
# `bash bench/gpu_carry.sh` (wheels for Python 3.12, bitsandbytes cut to its CUDA 13.0 library, and the embedded
# SmolLM2 GGUF in two parts) and pass it: `--carry .carry` (parts may also come from folders of earlier calls,
# `--carry DIR` can be repeated). Wheels are installed into a scratch folder put on PYTHONPATH; nothing on the
# node is changed. Python: $PYTHON, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ARGS=()
CARRY=()
while [ $# -gt 0 ]; do
  case "$1" in
    --carry) CARRY+=("$2"); shift 2 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true
if [ ${#CARRY[@]} -gt 0 ]; then
  SITE=${TMPDIR:-/tmp}/qlora-site
  mkdir -p "$SITE"
  wheels=()
  for d in "${CARRY[@]}"; do
    for w in "$d"/whl/*.whl; do [ -e "$w" ] && wheels+=("$w"); done
  done
  if [ ${#wheels[@]} -gt 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
    export PYTHONPATH="$SITE:${PYTHONPATH:-}"
  fi
  parts=()
  for d in "${CARRY[@]}"; do
    for p in "$d"/gguf/*.part-*; do [ -e "$p" ] && parts+=("$p"); done
  done
  if [ ${#parts[@]} -gt 0 ]; then
    GGUF=${TMPDIR:-/tmp}/qlora-carry/SmolLM2-135M-Instruct.Q4_1.gguf
    mkdir -p "$(dirname "$GGUF")"
    # parts are named <file>.part-aa, -ab, ...: sorted by file name they concatenate back to the file
    printf '%s\n' "${parts[@]}" | awk -F/ '{print $NF "\t" $0}' | sort | cut -f2 | xargs cat > "$GGUF"
    for d in "${CARRY[@]}"; do
      for s in "$d"/gguf/*.sha256; do
        [ -e "$s" ] && echo "$(cat "$s")  $GGUF" | sha256sum -c --quiet - && echo "embedded GGUF reassembled: $GGUF"
      done
    done
    export QLORA_EMBEDDED_GGUF="$GGUF"
  fi
fi
exec "$PY" bench/gpu_acceptance.py "${ARGS[@]}"
