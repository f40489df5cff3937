#!/usr/bin/env bash
# One call on the lent GPU machine (device tool): build memory3._C with the CUDA path, report
# what nvcc embedded, run the tests (CUDA tests included; they skip elsewhere) and the
# benchmarks (each checks its answer against the reference before timing), and print the
# short table last. Full logs go under $OUT. Exits non-zero when the build, a test or a
# benchmark fails; the benchmarks still run after failed tests, for the record.
#
#   device run: bash bench/gpu.sh          (carry .whl when wheels such as nvidia-cutlass
#                                           are needed there: see third_party/README.md)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed: see $OUT/nvidia-smi.txt"

echo "== build (CUDA on)"
start=$(date +%s)
if ! MEMORY3_WITH_CUDA=1 python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"
  exit 1
fi
echo "built in $(( $(date +%s) - start )) s"
memory3 info | tee "$OUT/info.txt"

echo "== tests"
tests=0
python3 -m pytest -q tests >"$OUT/tests.log" 2>&1 || tests=$?
tail -15 "$OUT/tests.log"

echo "== benchmarks"
python3 bench/table.py >"$OUT/table.md" 2>&1 || { tail -30 "$OUT/table.md"; exit 1; }
cat "$OUT/table.md"
# Prefill forward/backward (issue 13): sanitizers on one small call, then the timed table.
for tool in memcheck racecheck; do
  compute-sanitizer --tool "$tool" --error-exitcode 1 python3 bench/bench_gpu_prefill.py --sanitize-case \
    >"$OUT/sanitize_prefill_$tool.log" 2>&1 || { echo "compute-sanitizer $tool (prefill): see $OUT/sanitize_prefill_$tool.log"; tail -20 "$OUT/sanitize_prefill_$tool.log"; }
done
python3 bench/bench_gpu_prefill.py --json >"$OUT/prefill.md" 2>&1 || { tail -30 "$OUT/prefill.md"; exit 1; }
grep -v '^{' "$OUT/prefill.md"

if [ "$tests" -ne 0 ]; then
  echo "tests failed (pytest exit $tests): see $OUT/tests.log" >&2
  exit "$tests"
fi
