#!/usr/bin/env bash
# Prepare what an air-gapped GPU node (Python 3.12, torch + CUDA 13, transformers, peft, accelerate; no registry)
# needs for bench/gpu_acceptance.sh, as two folders of under 64 MiB each (the working tree travels with each):
#
#   .carry/a/whl/        wheels for Python 3.12: pydantic (+ core, annotated-types, typing-inspection), datasets
#                        (+ dill, multiprocess), gguf, chatterbot-corpus (the embedded data), mimalloc (cmeel-mimalloc
#                        + cmeel: the CLI's allocator) and bitsandbytes cut to its CPU and CUDA 13.0 libraries
#   .carry/a/artifacts/  prepare's tokenizer files and tokenized data (no weights): enough for the steps that do not
#                        need SmolLM2's weights (kernels, dequant, the 8B-shaped train bench)
#   .carry/a/gguf/       the first 40 MiB of the embedded SmolLM2 GGUF (+ its sha256)
#   .carry/b/gguf/       the rest of it
#
#   bash bench/gpu_carry.sh            # run here, after `make setup` and the prepare stage; .carry is ignored by git
#
# On the node, two calls back to back (the node stays up between them), see docs/gpu-acceptance.md:
#   1. carry .carry/a: bash bench/gpu_acceptance.sh --keep /tmp/qlora-a --carry .carry/a
#        --only dequant,kernels,bench-8b --bench-artifacts /tmp/qlora-a/artifacts
#   2. carry .carry/b: bash bench/gpu_acceptance.sh --carry /tmp/qlora-a --carry .carry/b
#        --only pipeline,bench-smollm2,profile
# Every call that joins the GGUF must name both parts' folders: the joined file is rebuilt from them each time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=.carry
grep -qx '/.carry/' .git/info/exclude 2>/dev/null || echo '/.carry/' >> .git/info/exclude
rm -rf "$OUT" && mkdir -p "$OUT/a/gguf" "$OUT/b/gguf" "$OUT/a/whl" "$OUT/a/artifacts/prepare/model"

GGUF=$("$PY" -c "from qlora_pipeline.stages.lm.modelio import embedded_gguf_path; print(embedded_gguf_path())")
NAME=$(basename "$GGUF")
split -b 40M -a 2 "$GGUF" "$OUT/a/gguf/$NAME.part-"
mv "$OUT/a/gguf/$NAME.part-a"[b-z] "$OUT/b/gguf/"
sha256sum "$GGUF" | cut -d' ' -f1 > "$OUT/a/gguf/$NAME.sha256"

PREP=artifacts/prepare
[ -d "$PREP/data" ] || { echo "no $PREP/data: run the prepare stage first (qlora run prepare)" >&2; exit 2; }
cp -r "$PREP/data" "$OUT/a/artifacts/prepare/"
for f in "$PREP"/model/*; do
  case "$(basename "$f")" in *.safetensors | *.safetensors.index.json) ;; *) cp "$f" "$OUT/a/artifacts/prepare/model/" ;; esac
done

PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# the versions this checkout's venv runs with
PINS=$("$PY" -c "
import importlib.metadata as m
names = ['pydantic', 'pydantic-core', 'annotated-types', 'typing-inspection', 'datasets', 'dill', 'multiprocess',
         'gguf', 'bitsandbytes', 'chatterbot-corpus', 'cmeel-mimalloc', 'cmeel']
print(' '.join(f'{n}=={m.version(n)}' for n in names))")
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
  -d "$OUT/a/whl" $PINS

# bitsandbytes: keep the CPU and CUDA 13.0 libraries, drop the others (and their RECORD lines), re-zip.
BNB=$(ls "$OUT"/a/whl/bitsandbytes-*.whl)
TMP=$(mktemp -d)
(cd "$TMP" && unzip -q "$OLDPWD/$BNB")
find "$TMP/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda130.so' -delete
sed -i -E '/libbitsandbytes_(cuda1[0-2][0-9]|cuda13[1-9]|rocm|xpu)/d' "$TMP"/bitsandbytes-*.dist-info/RECORD
rm "$BNB" && (cd "$TMP" && zip -q -r "$OLDPWD/$BNB" .) && rm -rf "$TMP"
du -sh "$OUT"/a "$OUT"/b
