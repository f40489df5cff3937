#!/usr/bin/env bash
# One call on the lent GPU machine (device tool): build memory3._C with the CUDA path, report
# what nvcc embedded, run the tests (CUDA tests included; they skip elsewhere) and the
# benchmarks, and print the short table last. Full logs go under $OUT.
#
#   device run: bash bench/gpu.sh          (carry .whl when wheels such as nvidia-cutlass
#                                           are needed there: see third_party/README.md)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1

echo "== build (CUDA on)"
start=$(date +%s)
if ! MEMORY3_WITH_CUDA=1 python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"
  exit 1
fi
echo "built in $(( $(date +%s) - start )) s"
memory3 info | tee "$OUT/info.txt"

echo "== tests"
python3 -m pytest -q tests 2>&1 | tee "$OUT/tests.log" | tail -5

echo "== benchmarks"
python3 bench/table.py 2>&1 | tee "$OUT/table.md"
