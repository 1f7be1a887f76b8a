#!/usr/bin/env bash
# The one script to run when a GPU is at hand (e.g. the device machine lent to a session):
#   bash scripts/gpu_check.sh [SECONDS_FOR_THE_STUDIES] [SECONDS_FOR_EDGE_PRUNING]
# 1. the device tests on CUDA, 2. the extraction and pruned-inference benchmarks on CUDA,
# 3. chapter 06b's missing Edge Pruning results (scripts/edge_runs.py, default 0 seconds: its
#    trainings cost hours each on a CPU; a training cut off leaves its checkpoint to go on from),
# 4. as many pending units of the studies in $STUDIES (default: the book's, Table 1's, then the
#    paper's design) as fit in the time given (finished units land in results/<study>/units; a
#    unit cut off by the time limit leaves its last complete layer in results/<study>/partial).
#    Everything it makes is copied to $OUT when that is set (the device tool brings $OUT back):
#    per study one archive of units/ and partial/, and one of results/edges.
# On a machine without this repository's .venv (the device tool's: no internet, its own torch),
# it installs what scripts/gpu_bundle.sh packed into .gpu/ (wheels and the stand-in's weights)
# into /tmp/site and uses the machine's python3; units then run serially (no Dask there).
set -uo pipefail
cd "$(dirname "$0")/.."
STUDY_SECONDS=${1:-300}
EDGE_SECONDS=${2:-0}
WORKERS=1
if [ -x .venv/bin/python ]; then
  PY=${PY:-.venv/bin/python}
elif [ -d .gpu/wheels ]; then
  PY=${PY:-python3}
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl || exit 1
  cat .gpu/part-* | tar -x -C /tmp/site || { echo "the stand-in's weights are incomplete: carry every .gpu/part-*"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
  $PY -c "import distributed" 2>/dev/null || WORKERS=0
else
  echo "no .venv and no .gpu/ bundle: run 'make setup' (with internet) or carry scripts/gpu_bundle.sh's .gpu/"; exit 1
fi
export PYTHONUNBUFFERED=1
# without .git here, units record the commit the bundle was made at (scripts/gpu_bundle.sh writes it)
[ -d .git ] || export CIRCUITLIB_COMMIT=${CIRCUITLIB_COMMIT:-$(cat .gpu/COMMIT 2>/dev/null)}
nvidia-smi --query-gpu=name,memory.total --format=csv
$PY -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'; print(torch.__version__, torch.cuda.get_device_name())"
$PY -m pytest -q -p no:cacheprovider tests/library/test_device.py tests/library/test_batched_candidates.py 2>&1 | tail -3
PLAIN=24; $PY -c "import transformer_lens" 2>/dev/null || PLAIN=0
$PY benchmarks/extraction_speed.py --device cuda --plain-steps $PLAIN 2>&1 | tail -9
$PY benchmarks/pruned_inference.py --device cuda --no-onnx 2>&1 | tail -8
if [ "$EDGE_SECONDS" -gt 30 ]; then
  # a checkpoint of a CPU training cannot resume on CUDA (its generator state is the CPU's): set it
  # aside and train that target afresh here; the result file this writes supersedes the CPU run
  for f in results/edges/*.ckpt; do [ -e "$f" ] && mv "$f" "$f.cpu-run"; done
  timeout --signal=INT "$EDGE_SECONDS" $PY scripts/edge_runs.py --legacy --device cuda --threads 4 --checkpoint-every 25
fi
STUDIES=${STUDIES:-studies/book.yml studies/table1.yml studies/paper.yml}
END=$((SECONDS + STUDY_SECONDS))
for spec in $STUDIES; do
  left=$((END - SECONDS)); [ "$left" -gt 30 ] || break
  timeout --signal=INT "$left" $PY -m circuitlib study run "$spec" --workers $WORKERS --device cuda --threads 4
  $PY -m circuitlib study status "$spec" | head -3
done
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/benchmarks" "$OUT/results"
  cp benchmarks/results/*-cuda.json "$OUT/benchmarks/" 2>/dev/null
  for spec in $STUDIES; do      # one archive per study: the tool brings back at most 8 files, 2 folders down
    name=$(basename "$spec" .yml)
    parts=$(cd results && ls -d "$name/units" "$name/partial" 2>/dev/null)
    [ -n "$parts" ] && tar -C results -czf "$OUT/results/$name-units.tar.gz" $parts
  done
  [ -d results/edges ] && tar -C results --exclude='*.cpu-run' -czf "$OUT/results/edges.tar.gz" edges
fi
