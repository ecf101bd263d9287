#!/usr/bin/env bash
# GPU acceptance in one call: kernels vs references, the pipeline's compute stages on the device, the training bench
# vs transformers+bitsandbytes+peft on SmolLM2 and an 8B-shaped model, NF4 dequant bandwidth. Writes
# bench/results/gpu-*.json; the steps are described in bench/gpu_acceptance.py.
#
#   bash bench/gpu_acceptance.sh                     # on a GPU node, from the repository root
#   bash bench/gpu_acceptance.sh --device cpu        # dry run of every step on a CPU (also the CPU reference)
#
# On an air-gapped node whose Python lacks the project's packages, prepare the carry folders here with
# `bash bench/gpu_carry.sh` (wheels for Python 3.12, bitsandbytes cut to its CUDA 13.0 library, prepare's tokenizer
# and data, and the embedded SmolLM2 GGUF in two parts) and pass them: `--carry DIR` can be repeated, and
# `--keep DIR` first copies the carried folders into DIR, which outlives the call, for a second call on the same
# node (docs/gpu-acceptance.md). Wheels are installed into a scratch folder put on PYTHONPATH; nothing on the node
# is changed. The GGUF is used only when its parts join to the recorded sha256. Python: $PYTHON, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ARGS=()
CARRY=()
KEEP=
while [ $# -gt 0 ]; do
  case "$1" in
    --carry) CARRY+=("$2"); shift 2 ;;
    --keep) KEEP=$2; shift 2 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true
if [ -n "$KEEP" ]; then
  mkdir -p "$KEEP"
  for d in "${CARRY[@]}"; do cp -r "$d"/. "$KEEP"/; done
  CARRY=("$KEEP")
fi
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
    # parts are named <file>.part-aa, -ab, ...: sorted by file name they concatenate back to the file. Joined into
    # a temporary file first, so a call that carries only some parts never spoils a file an earlier call joined.
    printf '%s\n' "${parts[@]}" | awk -F/ '{print $NF "\t" $0}' | sort | cut -f2 | xargs cat > "$GGUF.joining"
    for d in "${CARRY[@]}"; do
      for s in "$d"/gguf/*.sha256; do
        [ -e "$s" ] || continue
        if echo "$(cat "$s")  $GGUF.joining" | sha256sum -c --quiet - >/dev/null 2>&1; then
          mv "$GGUF.joining" "$GGUF" && echo "embedded GGUF reassembled: $GGUF"
        fi
        if [ -e "$GGUF" ] && echo "$(cat "$s")  $GGUF" | sha256sum -c --quiet - >/dev/null 2>&1; then
          export QLORA_EMBEDDED_GGUF="$GGUF"
        fi
      done
    done
    rm -f "$GGUF.joining"
    [ -n "${QLORA_EMBEDDED_GGUF:-}" ] || echo "GGUF parts do not join to the recorded sha256 yet: not used"
  fi
fi
exec "$PY" bench/gpu_acceptance.py "${ARGS[@]}"
