#!/usr/bin/env bash
# The device check: run from the repository root on a machine with a CUDA GPU
# (no network needed; python3 there must have cupy, numpy, scipy, pytest,
# hypothesis, and torch for the torch tests, the cuDNN yardstick and the
# model timings). Under 8 minutes on one H200 before the captured model rows,
# the capture tests and the layer breakdown were added; not yet timed with them
# (torch.compile takes minutes; the step limits below add up to 31 minutes).
#
#   bash bench/device_check.sh RESULTS_DIR
#
# Writes to RESULTS_DIR (9 files): summary.md (machine, what passed, the
# op, model, layer-breakdown and sweep tables, host cost per call), gpu_tests.log, sanitizer.log (memcheck and
# racecheck), bench.log, ops.json (op timings), models.json (model timings: eager,
# CUDA-graph and torch.compile rows), breakdown.json (time per layer type),
# sweeps.json and sweeps.png (scaling sweeps; the plot needs matplotlib).
set -u
out=${1:?usage: bash bench/device_check.sh RESULTS_DIR}
mkdir -p "$out"
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PYTHONPATH="$root/src:$root/bench:$root/tests${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
status=0
steps=$(mktemp)
environment=$(mktemp)
tables=$(mktemp -d)   # markdown tables: they go into summary.md

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  python3 -c "import sys, numpy, scipy, cupy; print('python', sys.version.split()[0]); print('numpy', numpy.__version__, 'scipy', scipy.__version__, 'cupy', cupy.__version__, 'cuda runtime', cupy.cuda.runtime.runtimeGetVersion())"
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1
  nvcc --version 2>&1 | tail -1
  # The device machine gets the working tree without .git: the caller may pass the commit.
  echo "commit ${INVCONV_COMMIT:-$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)}"
} > "$environment" 2>&1
cat "$environment"

step() {  # step NAME LOG TIMEOUT CMD...: run, append to LOG, record pass/fail
  local name=$1 log=$2 limit=$3; shift 3
  local t0=$SECONDS
  echo "=== $name: $*" >> "$out/$log"
  timeout "$limit" "$@" >> "$out/$log" 2>&1
  local rc=$?
  local verdict=PASS; [ $rc -eq 0 ] || { verdict="FAIL (exit $rc)"; status=1; }
  echo "| $name | $verdict | $((SECONDS - t0)) s |" | tee -a "$steps"
  tail -n 3 "$out/$log"
}
echo "| step | result | time |" > "$steps"
echo "|---|---|---|" >> "$steps"

step gpu_tests gpu_tests.log 360 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_torch_gpu.py tests/test_capture.py
step memcheck sanitizer.log 90 compute-sanitizer --tool memcheck --error-exitcode 9 python3 bench/sanitize_ops.py
step racecheck sanitizer.log 90 compute-sanitizer --tool racecheck --error-exitcode 9 python3 bench/sanitize_ops.py
step bench_ops bench.log 150 python3 bench/bench_ops.py --device-check --out "$out/ops.json" --markdown "$tables/ops.md"
step bench_models bench.log 360 python3 bench/bench_models.py --out "$out/models.json" --markdown "$tables/models.md"
step bench_breakdown bench.log 180 python3 bench/bench_breakdown.py --out "$out/breakdown.json" --markdown "$tables/breakdown.md"
step host_profile bench.log 60 python3 bench/profile_host.py --calls 300 --out "$tables/host.txt"
step bench_sweeps bench.log 150 python3 bench/bench_sweeps.py --out "$out/sweeps.json" --markdown "$tables/sweeps.md" --plot "$out/sweeps.png"

{
  echo "# Device check"
  echo
  echo '```'
  cat "$environment"
  echo '```'
  echo
  cat "$steps"
  echo
  grep -E "passed|failed" "$out/gpu_tests.log" | tail -n 1
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$out/sanitizer.log"
  echo
  [ -f "$tables/ops.md" ] && cat "$tables/ops.md"
  echo
  [ -f "$tables/models.md" ] && cat "$tables/models.md"
  echo
  [ -f "$tables/breakdown.md" ] && cat "$tables/breakdown.md"
  echo
  [ -f "$tables/sweeps.md" ] && cat "$tables/sweeps.md"
  echo
  if [ -f "$tables/host.txt" ]; then
    echo '```'
    sed -n '1,/^$/p' "$tables/host.txt"   # the host-cost table; the profiles are in bench.log
    echo '```'
  fi
} > "$out/summary.md"
exit $status
