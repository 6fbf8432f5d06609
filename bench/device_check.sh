#!/usr/bin/env bash
# The device check: run from the repository root on a machine with a CUDA GPU
# (no network needed; python3 there must have cupy, numpy, scipy, pytest,
# hypothesis, and torch for the torch tests, the cuDNN yardstick and the
# model timings). The whole check no longer fits one device call (10 minutes
# at most, 15 minutes of device time a task), so it runs in parts, each its
# own call, all writing to one RESULTS_DIR; summary.md is rebuilt after each:
#
#   bash bench/device_check.sh RESULTS_DIR kernels   # GPU tests, sanitizers, schedules, op bench (~7.5 min est.)
#   bash bench/device_check.sh RESULTS_DIR models    # capture tests, model timings, layer breakdown (not yet timed)
#   bash bench/device_check.sh RESULTS_DIR sweeps    # host cost per call, scaling sweeps (~3 min est.)
#   bash bench/device_check.sh RESULTS_DIR           # all three, one after another
#
# Writes to RESULTS_DIR: summary.md (machine, what passed, the
# op, model, layer-breakdown and sweep tables, host cost per call), gpu_tests.log, sanitizer.log (memcheck and
# racecheck), bench.log, ops.json (op timings), models.json (model timings: eager,
# CUDA-graph and torch.compile rows), breakdown.json (time per layer type),
# sweeps.json and sweeps.png (scaling sweeps; the plot needs matplotlib), and
# steps.md, environment.txt and tables/ (what summary.md is built from).
#
# The solve schedules that are off by default (INVCONV_SOLVE_SCHEDULE, see
# src/invconv/_kernels.py) are checked and timed in the same run: the GPU
# correctness tests and compute-sanitizer run under each, and the op bench and
# sweeps time each beside the default (summary.md: "Solve schedules"), so the
# default can be chosen by measurement. INVCONV_CHECK_SCHEDULES overrides the
# list (comma-separated; empty for none), INVCONV_CHECK_SWEEP_SCHEDULES the
# shorter one the sweeps time. The convolution schedules off by default
# (INVCONV_CONV_SCHEDULE) likewise: GPU tests, memcheck and racecheck (they
# stage weights in shared memory) under each, and the op bench times the
# convolution and its vjp under each (summary.md: "Convolution schedules");
# INVCONV_CHECK_CONV_SCHEDULES overrides that list.
set -u
out=${1:?usage: bash bench/device_check.sh RESULTS_DIR [kernels|models|sweeps|all]}
part=${2:-all}
case "$part" in kernels|models|sweeps|all) ;; *) echo "unknown part: $part" >&2; exit 2;; esac
mkdir -p "$out" "$out/tables"
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
status=0
steps="$out/steps.md"         # one line per step, across parts
environment="$out/environment.txt"
tables="$out/tables"          # markdown tables: they go into summary.md

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
[ -f "$steps" ] || printf '| step | result | time |\n|---|---|---|\n' > "$steps"

schedules=${INVCONV_CHECK_SCHEDULES-lanes,diagonal:2,diagonal:4,tiled,tiled:16x16}
sweep_schedules=${INVCONV_CHECK_SWEEP_SCHEDULES-diagonal:2,tiled}
conv_schedules=${INVCONV_CHECK_CONV_SCHEDULES-smem:1,smem,smem:4}

if [ "$part" = kernels ] || [ "$part" = all ]; then
  step gpu_tests gpu_tests.log 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_torch_gpu.py
  step memcheck sanitizer.log 90 compute-sanitizer --tool memcheck --error-exitcode 9 python3 bench/sanitize_ops.py
  step racecheck sanitizer.log 90 compute-sanitizer --tool racecheck --error-exitcode 9 python3 bench/sanitize_ops.py
  for schedule in ${schedules//,/ }; do
    step "gpu_tests[$schedule]" gpu_tests.log 120 env INVCONV_SOLVE_SCHEDULE="$schedule" python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py -k "(matches_reference and float32) or (nonfinite and inv_conv2d) or graph"
    step "memcheck[$schedule]" sanitizer.log 90 env INVCONV_SOLVE_SCHEDULE="$schedule" compute-sanitizer --tool memcheck --error-exitcode 9 python3 bench/sanitize_ops.py
  done
  for schedule in ${conv_schedules//,/ }; do
    step "gpu_tests[$schedule]" gpu_tests.log 120 env INVCONV_CONV_SCHEDULE="$schedule" python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py -k "(matches_reference and float32) or (nonfinite and conv2d and not inv_conv2d)"
    step "memcheck[$schedule]" sanitizer.log 90 env INVCONV_CONV_SCHEDULE="$schedule" compute-sanitizer --tool memcheck --error-exitcode 9 python3 bench/sanitize_ops.py
    step "racecheck[$schedule]" sanitizer.log 90 env INVCONV_CONV_SCHEDULE="$schedule" compute-sanitizer --tool racecheck --error-exitcode 9 python3 bench/sanitize_ops.py
  done
  step spline_gpu_tests gpu_tests.log 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_spline.py
  step bench_ops bench.log 300 python3 bench/bench_ops.py --device-check --schedules "$schedules${conv_schedules:+,$conv_schedules}" --out "$out/ops.json" --markdown "$tables/ops.md"
fi
if [ "$part" = models ] || [ "$part" = all ]; then
  step capture_tests gpu_tests.log 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_capture.py
  step bench_models bench.log 300 python3 bench/bench_models.py --out "$out/models.json" --markdown "$tables/models.md"
  step bench_models_fused_spline bench.log 200 env INVCONV_SPLINE=fused python3 bench/bench_models.py --quick --methods eager graph --out "$out/models-fused-spline.json" --markdown "$tables/models-fused-spline.md"
  step bench_breakdown bench.log 180 python3 bench/bench_breakdown.py --out "$out/breakdown.json" --markdown "$tables/breakdown.md"
fi
if [ "$part" = sweeps ] || [ "$part" = all ]; then
  step host_profile bench.log 60 python3 bench/profile_host.py --calls 300 --out "$tables/host.txt"
  step bench_sweeps bench.log 240 python3 bench/bench_sweeps.py --schedules "$sweep_schedules" --out "$out/sweeps.json" --markdown "$tables/sweeps.md" --plot "$out/sweeps.png"
fi

{
  echo "# Device check"
  echo
  echo '```'
  cat "$environment"
  echo '```'
  echo
  cat "$steps"
  echo
  grep -E "passed|failed" "$out/gpu_tests.log" 2>/dev/null
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$out/sanitizer.log" 2>/dev/null
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
