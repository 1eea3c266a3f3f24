#!/usr/bin/env bash
# The one prepared pass over everything that needs a GPU, for a session lent one (the device
# tool of the tool library). Before it, HERE: `bash benchmarks/gpu/fetch_wheels.sh`. Then:
#
#   run(command="bash benchmarks/gpu/session.sh", carry=[".whl"], timeout_s=600)
#
# THERE (Python 3.12, PyTorch 2.11+cu130, no network) it installs the carried wheels, builds
# the project (native extension, protobuf modules) against the image's packages, and runs,
# most important first, each step under its own time limit so that a failing step costs only
# its own minutes:
#   1. bench_train.py at the paper's sizes (issue 3: MOD-12 >= 1,600 examples/s, bf16)
#   2. bench_pipeline.py's GPU section (issue 5: >= 3.0M segments/s, >= 30K videos/s)
#   3. the tests marked `cuda` (bf16 training and resume, grouped leaves, the torch backend
#      with CUDA graphs)
#   4. bench_pipeline.py again with torch.compile
# Everything lands in $OUT: log.txt and the two results files, which start as copies of
# benchmarks/results/ so that their CPU sections are kept; copy them back into
# benchmarks/results/ with the date and device they record.
set -uo pipefail
OUT=${OUT:-runs/gpu-session}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
started=$SECONDS

# The whole pass must end inside one device call (600 s at most, the machine's start not
# counted): a step gets at most what is left of BUDGET_S, and is skipped under 30 s.
BUDGET_S=${BUDGET_S:-570}

step() {  # step LIMIT_S NAME COMMAND...
  local limit=$1 name=$2 begin=$SECONDS left=$((BUDGET_S - SECONDS + started))
  shift 2
  if ((left < 30)); then
    echo "=== $name: skipped, ${left} s of the budget left"
    return
  fi
  ((limit > left)) && limit=$left
  echo "=== $name (limit ${limit} s, at $((SECONDS - started)) s)"
  timeout --kill-after=5 "$limit" "$@"
  echo "=== $name: exit $? after $((SECONDS - begin)) s"
}

step 60 "carried wheels" python3 -m pip install -q --no-index --no-deps --no-compile \
  --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
step 180 "build and install" python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .
step 30 "environment" bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, modloc.engine._native; print(\"torch\", torch.__version__, torch.cuda.get_device_name())"'

cp benchmarks/results/bench_train.md benchmarks/results/bench_pipeline.md "$OUT/"
step 150 "bench_train (paper sizes, bf16)" python3 benchmarks/bench_train.py --out "$OUT/bench_train.md"
step 150 "bench_pipeline (GPU section)" python3 benchmarks/bench_pipeline.py --backends \
  --out "$OUT/bench_pipeline.md"
step 90 "tests marked cuda" python3 -m pytest -q -m cuda -p no:cacheprovider -rs tests
step 150 "bench_pipeline (GPU section, torch.compile)" python3 benchmarks/bench_pipeline.py \
  --backends --compile --out "$OUT/bench_pipeline.md"
echo "=== done in $((SECONDS - started)) s"
