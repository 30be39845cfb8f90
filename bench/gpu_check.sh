#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py): installs the carried wheels, then runs every part within BUDGET
# seconds (default 480). On the device tool, from the repository root:
#   bash bench/gpu_wheels.sh     # here, once: downloads/builds the wheels into bench/gpu_wheels/ (~6 MB)
#   run(command="OUT=$OUT bash bench/gpu_check.sh", carry=["bench/gpu_wheels"], timeout_s=540)
# Results: $OUT/results.json, $OUT/summary.md and a log per part. `bash bench/gpu_check.sh --dry-run` runs every
# part at tiny sizes on CPU with the Python it is given (PY=.venv/bin/python; tests/bench/test_gpu_check.py does).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/gpu_out}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G "bench/gpu_wheels/*.whl" >/dev/null && [[ " $* " != *" --dry-run "* ]]; then  # cp312 wheels
  site=$(mktemp -d)/site
  $PY -m pip install -q --no-index --no-deps --target "$site" bench/gpu_wheels/*.whl && export PYTHONPATH="$site:$PYTHONPATH" \
    || echo "gpu_check: installing the carried wheels failed; the training parts will say what is missing"
fi
exec $PY bench/gpu_check.py --out "$OUT" --budget "${BUDGET:-480}" "$@"
