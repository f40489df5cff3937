#!/usr/bin/env bash
# One call on the lent GPU machine (H100/H200, device tool; budget: one call of at most 10
# minutes): build memory3._C for sm_90a only with all cores, report what nvcc embedded, run
# the CUDA tests, compute-sanitizer memcheck + racecheck on one small call of every kernel
# path, the GPU benchmarks (each checks its answer against the reference before timing),
# and print one short table last. Full logs under $OUT. Every stage has its own time limit
# so a hang in one still leaves the others' results; the exit code is non-zero when any
# stage failed.
#
#   device run: bash bench/gpu.sh          (carry .whl when wheels such as nvidia-cutlass
#                                           or faiss-cpu are wanted there: third_party/README.md)
# Expected wall time on an H200 with 16 cores: build ~3-4 min, tests ~1-2 min, sanitizer ~1-2
# min, benchmarks ~1-2 min: 6-9 min (never measured yet: bench/RESULTS.md, "CUDA, part 1").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
# One device call may run 10 minutes: every stage gets at most its own limit and what is left
# of 580 s, so a slow stage shortens the later ones instead of losing the whole call.
deadline=$(( $(date +%s) + 580 ))
budget() {  # budget LIMIT [RESERVE]: seconds for the next stage (0: skip it)
  local left=$(( deadline - $(date +%s) - ${2:-0} ))
  if [ "$left" -lt 20 ]; then echo 0; elif [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}
run_limited() {  # run_limited SECONDS CMD...: CMD under that limit; 0 seconds: skipped (exit 124)
  local limit=$1
  shift
  if [ "$limit" -eq 0 ]; then echo "skipped, no time left: $*"; return 124; fi
  timeout "$limit" "$@"
}
stage() { echo "== $1 ($(date +%T), $(( deadline - $(date +%s) )) s left)"; }
failed() { echo "!! $1 failed (exit $2): see $OUT/$3" >&2; status=1; }

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed: see $OUT/nvidia-smi.txt"

stage "build (CUDA on, sm_90a only, $(nproc) jobs)"
start=$(date +%s)
if ! MEMORY3_WITH_CUDA=1 MEMORY3_CUDA_ARCHS=90a MAX_JOBS=$(nproc) timeout 330 \
    python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  grep -E "error|Error" "$OUT/build.log" | head -40
  tail -30 "$OUT/build.log"
  echo "build failed: see $OUT/build.log" >&2
  exit 1
fi
echo "built in $(( $(date +%s) - start )) s"
memory3 info | tee "$OUT/info.txt"

stage "CUDA tests"
xdist=()
python3 -c "import xdist" 2>/dev/null && xdist=(-n 4)
run_limited "$(budget 180 200)" python3 -m pytest -q -m cuda "${xdist[@]}" tests >"$OUT/tests.log" 2>&1
rc=$?; [ $rc -eq 0 ] || failed "CUDA tests" $rc tests.log
tail -25 "$OUT/tests.log"

stage "compute-sanitizer (memcheck, racecheck)"
sanitize=()
for tool in memcheck racecheck; do
  # Without the caching allocator every tensor is its own allocation, so memcheck sees its bounds.
  limit=$(budget 90 150)
  if [ "$limit" -eq 0 ]; then sanitize+=("$tool: skipped (no time left)"); continue; fi
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$limit" compute-sanitizer --tool "$tool" \
    python3 bench/gpu_sanitize_cases.py >"$OUT/sanitize_$tool.log" 2>&1
  rc=$?
  summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/sanitize_$tool.log" | tail -1)
  if [ $rc -ne 0 ] || ! grep -q "all ran and matched" "$OUT/sanitize_$tool.log" || \
     grep -qE "SUMMARY: [1-9]" <<<"$summary"; then
    failed "compute-sanitizer $tool" $rc "sanitize_$tool.log"
    grep -m 12 -E "Invalid|Race|Hazard|ERROR|Error|error" "$OUT/sanitize_$tool.log"
  fi
  sanitize+=("$tool: ${summary:-no summary (exit $rc)}")
done

stage "benchmarks"
results="$OUT/gpu_results.jsonl"
rm -f "$results"
run_limited "$(budget 150 40)" python3 bench/bench_gpu_decode.py --json "$results" >"$OUT/bench_decode.md" 2>&1
rc=$?; [ $rc -eq 0 ] || { failed "bench_gpu_decode" $rc bench_decode.md; tail -15 "$OUT/bench_decode.md"; }
run_limited "$(budget 100 10)" python3 bench/bench_gpu_memory.py --json "$results" >"$OUT/bench_memory.md" 2>&1
rc=$?; [ $rc -eq 0 ] || { failed "bench_gpu_memory" $rc bench_memory.md; tail -15 "$OUT/bench_memory.md"; }
for other in bench/bench_gpu_*.py; do  # benchmarks other issues add (prefill, backward)
  case "$other" in bench/bench_gpu_decode.py|bench/bench_gpu_memory.py) continue ;; esac
  name=$(basename "$other" .py)
  limit=$(budget 60 10)
  [ "$limit" -eq 0 ] && { echo "$name: skipped (no time left)"; continue; }
  timeout "$limit" python3 "$other" >"$OUT/$name.md" 2>&1
  rc=$?; [ $rc -eq 0 ] || { failed "$name" $rc "$name.md"; tail -15 "$OUT/$name.md"; }
  [ $rc -ne 0 ] || cat "$OUT/$name.md"
done
cat "$OUT/bench_decode.md" "$OUT/bench_memory.md"

stage "summary"
grep -E "passed|failed|error" "$OUT/tests.log" | tail -1 | sed 's/^/tests: /'
printf 'sanitizer %s\n' "${sanitize[@]}"
[ -s "$results" ] && python3 bench/gpu_table.py "$results" | tee "$OUT/table.md"
exit $status
