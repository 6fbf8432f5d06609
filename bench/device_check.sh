#!/usr/bin/env bash
# The device check, one call: run from the repository root on a machine with
# a CUDA GPU (no network needed; python3 there must have cupy, numpy, scipy,
# pytest, hypothesis, torch, and pytest-xdist to run the GPU tests in
# parallel, without which they run serially).
#
#   bash bench/device_check.sh RESULTS_DIR          # correctness, then timings (one call)
#   bash bench/device_check.sh RESULTS_DIR extra    # scaling sweeps and layer breakdown (a second call)
#
# Phase 1, correctness, its jobs running at once (each its own log): the GPU
# tests (-m gpu, with xdist where installed), compute-sanitizer memcheck and
# racecheck on bench/sanitize_ops.py under the default schedules, and a
# subset of the GPU tests plus memcheck and racecheck under each schedule
# the defaults do not pick, each schedule a job of its own
# (INVCONV_CHECK_SCHEDULES, INVCONV_CHECK_CONV_SCHEDULES override the lists;
# comma-separated, empty for none). Phase 2, timings, one at a
# time with the GPU to themselves: the op bench with its fair rows
# (graph replays against cuDNN's graph replays, every schedule beside the
# default), the model bench, the call-cost bench (bench/overhead.py: flow
# shapes and training steps, eager and captured) and the host profile.
#
# Time: an estimate, not yet a measurement of this version (its parts were
# timed separately on an H200 on 2026-11-28: GPU tests 44 s serially,
# memcheck 3 s, racecheck 6 s, op bench 33 s at 7 shapes without schedules):
# phase 1 about 2 minutes, phase 2 about 4 (the op bench at 12 shapes and 10
# schedules most of it). Limits make it hold whatever the estimate's error:
# the whole call gets INVCONV_CHECK_BUDGET_S (default 470 s, under 8
# minutes), phase 1 at most INVCONV_CHECK_CORRECTNESS_S (180 s) of it; each
# step's limit is cut to what is left, a step with no time left is recorded
# as skipped, and the summary is always written.
#
# Writes to RESULTS_DIR: summary.md (machine, the timing tables, then the
# table of steps with their results and times, which is also printed last),
# steps.json (the same steps), ops.json, models.json, overhead.json (the
# timings), logs (gpu_tests.log, sanitizer.log, schedules_NAME.log per
# schedule, bench.log), environment.txt and tables/ (what
# summary.md is built from). INVCONV_CHECK_DRY_RUN=1 records each command in
# dry_run.txt instead of running it (the tests check the script that way).
set -u
out=${1:?usage: bash bench/device_check.sh RESULTS_DIR [check|extra]}
part=${2:-check}
case "$part" in check|extra) ;; *) echo "unknown part: $part (check or extra)" >&2; exit 2;; esac
mkdir -p "$out" "$out/tables"
out=$(cd "$out" && pwd)
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
dry=${INVCONV_CHECK_DRY_RUN:-0}
deadline=$((SECONDS + ${INVCONV_CHECK_BUDGET_S:-470}))
steps_tsv="$out/steps.tsv"   # phase, step, result, seconds: one line per step
environment="$out/environment.txt"
tables="$out/tables"
: > "$steps_tsv"

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  python3 -c "import sys, numpy, scipy, cupy; print('python', sys.version.split()[0]); print('numpy', numpy.__version__, 'scipy', scipy.__version__, 'cupy', cupy.__version__, 'cuda runtime', cupy.cuda.runtime.runtimeGetVersion())" 2>&1
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1
  nvcc --version 2>&1 | tail -1
  # The device machine gets the working tree without .git: the caller may pass the commit.
  echo "commit ${INVCONV_COMMIT:-$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)}"
} > "$environment" 2>&1
cat "$environment"

# step PHASE NAME LOG LIMIT CMD...: run CMD with at most LIMIT seconds (less
# if the call's budget has less left), append its output to LOG, record it.
step() {
  local phase=$1 name=$2 log=$3 limit=$4; shift 4
  local t0=$SECONDS left=$((deadline - SECONDS - 15))   # 15 s kept for the summary
  [ $((phase_end - SECONDS)) -ge "$left" ] || left=$((phase_end - SECONDS))
  [ "$limit" -le "$left" ] || limit=$left
  if [ "$limit" -lt 5 ]; then
    printf '%s\t%s\t%s\t%s\n' "$phase" "$name" "SKIPPED (no time left)" 0 >> "$steps_tsv"
    return
  fi
  echo "=== $name: $*" >> "$out/$log"
  local rc=0
  if [ "$dry" = 1 ]; then
    printf '%s\t%s\t%s\n' "$phase" "$name" "$*" >> "$out/dry_run.txt"
  else
    timeout "$limit" "$@" >> "$out/$log" 2>&1 || rc=$?
  fi
  local verdict=PASS
  [ $rc -eq 0 ] || verdict="FAIL (exit $rc)"
  [ $rc -eq 124 ] && verdict="FAIL (timed out after $limit s)"
  printf '%s\t%s\t%s\t%s\n' "$phase" "$name" "$verdict" $((SECONDS - t0)) >> "$steps_tsv"
  echo "[$phase] $name: $verdict ($((SECONDS - t0)) s)"
}

# The schedules the defaults do not pick (see src/invconv/_kernels.py): the
# solves' default "auto" picks among diagonal, lanes and diagonal:2 by shape;
# slices[:S] and bands[:R] (bands of R rows pipelined over many SMs, for
# large images at small batch: 1x3x1024x1024) are new and untimed.
schedules=${INVCONV_CHECK_SCHEDULES-diagonal,lanes,diagonal:2,lanes:2,slices:2,slices,slices:8,bands:8,bands}
conv_schedules=${INVCONV_CHECK_CONV_SCHEDULES-direct,smem:2,smem:4}
if python3 -c "import xdist" 2>/dev/null; then parallel=(-n 6); else parallel=(); fi
pytest_gpu=(python3 -m pytest -q -m gpu -p no:cacheprovider)
solve_subset="(matches_reference and float32) or (nonfinite and inv_conv2d) or graph"
conv_subset="(matches_reference and float32) or (nonfinite and conv2d and not inv_conv2d)"
sanitize=(--error-exitcode 9 python3 bench/sanitize_ops.py)

phase_end=$deadline
if [ "$part" = check ]; then
  # Phase 1: correctness, all at once; the GPU is shared, the timings wait.
  # It gets INVCONV_CHECK_CORRECTNESS_S (default 180 s) of the budget.
  phase_end=$((SECONDS + ${INVCONV_CHECK_CORRECTNESS_S:-180}))
  step correctness gpu_tests gpu_tests.log 240 "${pytest_gpu[@]}" "${parallel[@]}" \
    tests/test_gpu.py tests/test_torch_gpu.py tests/test_capture.py &
  {
    step correctness memcheck sanitizer.log 120 compute-sanitizer --tool memcheck "${sanitize[@]}"
    step correctness racecheck sanitizer.log 120 compute-sanitizer --tool racecheck "${sanitize[@]}"
  } &
  # One job per schedule, each with a log of its own (schedules_NAME.log).
  for schedule in ${schedules//,/ }; do
    log="schedules_${schedule//:/-}.log"
    {
      step correctness "gpu_tests[$schedule]" "$log" 120 \
        env INVCONV_SOLVE_SCHEDULE="$schedule" "${pytest_gpu[@]}" tests/test_gpu.py -k "$solve_subset"
      step correctness "memcheck[$schedule]" "$log" 90 \
        env INVCONV_SOLVE_SCHEDULE="$schedule" compute-sanitizer --tool memcheck "${sanitize[@]}"
      step correctness "racecheck[$schedule]" "$log" 90 \
        env INVCONV_SOLVE_SCHEDULE="$schedule" compute-sanitizer --tool racecheck "${sanitize[@]}"
    } &
  done
  for schedule in ${conv_schedules//,/ }; do
    log="schedules_${schedule//:/-}.log"
    {
      step correctness "gpu_tests[$schedule]" "$log" 120 \
        env INVCONV_CONV_SCHEDULE="$schedule" "${pytest_gpu[@]}" tests/test_gpu.py -k "$conv_subset"
      step correctness "memcheck[$schedule]" "$log" 90 \
        env INVCONV_CONV_SCHEDULE="$schedule" compute-sanitizer --tool memcheck "${sanitize[@]}"
      step correctness "racecheck[$schedule]" "$log" 90 \
        env INVCONV_CONV_SCHEDULE="$schedule" compute-sanitizer --tool racecheck "${sanitize[@]}"
    } &
  done
  wait

  # Phase 2: timings, one at a time, nothing else on the GPU. The op bench
  # writes ops.json after each shape, so a cut-off run keeps what it timed;
  # the model bench times eager and captured passes (torch.compile's rows,
  # minutes of compiling, are left to a run of their own).
  phase_end=$deadline
  all_schedules="$schedules${conv_schedules:+${schedules:+,}$conv_schedules}"
  step timings bench_ops bench.log 200 python3 bench/bench_ops.py --device-check \
    --row-budget-s 0.4 ${all_schedules:+--schedules "$all_schedules"} \
    --out "$out/ops.json" --markdown "$tables/ops.md"
  step timings bench_models bench.log 90 python3 bench/bench_models.py --methods eager graph \
    --out "$out/models.json" --markdown "$tables/models.md"
  # the fused spline kernels (off by default until the GPU tests above pass them)
  step timings bench_models_fused_spline bench.log 60 env INVCONV_SPLINE=fused \
    python3 bench/bench_models.py --quick --methods eager graph \
    --out "$out/models-fused-spline.json" --markdown "$tables/models-fused-spline.md"
  # per-call cost at the flow shapes and the training steps, eager and captured
  # (about 50 s: 0.3 s a row)
  step timings call_cost bench.log 100 python3 bench/overhead.py --device cuda --training \
    --repeats 5 --budget 0.3 --out "$out/overhead.json" --markdown "$tables/overhead.md"
  step timings host_profile bench.log 20 python3 bench/profile_host.py --calls 300 \
    --out "$tables/host.txt"
else
  step extra bench_sweeps bench.log 240 python3 bench/bench_sweeps.py --schedules diagonal:2,lanes \
    --out "$out/sweeps.json" --markdown "$tables/sweeps.md" --plot "$out/sweeps.png"
  step extra bench_breakdown bench.log 180 python3 bench/bench_breakdown.py \
    --out "$out/breakdown.json" --markdown "$tables/breakdown.md"
fi

# The steps as JSON and as the table printed last.
python3 - "$steps_tsv" "$out/steps.json" "$tables/steps.md" "$SECONDS" <<'EOF'
import json, sys
tsv, json_path, md_path, total = sys.argv[1:]
rows = [dict(zip(("phase", "step", "result", "seconds"), line.rstrip("\n").split("\t")))
        for line in open(tsv) if line.strip()]
for r in rows:
    r["seconds"] = int(r["seconds"])
json.dump({"total_seconds": int(total), "steps": rows}, open(json_path, "w"), indent=1)
lines = ["| phase | step | result | time |", "|---|---|---|---|"]
lines += [f"| {r['phase']} | {r['step']} | {r['result']} | {r['seconds']} s |" for r in rows]
lines.append(f"| all | whole call | {sum(r['result'] == 'PASS' for r in rows)} of {len(rows)} "
             f"passed | {total} s |")
open(md_path, "w").write("\n".join(lines) + "\n")
EOF

{
  echo "# Device check ($part)"
  echo
  echo '```'
  cat "$environment"
  echo '```'
  echo
  grep -hE "[0-9]+ (passed|failed)" "$out"/gpu_tests.log "$out"/schedules_*.log 2>/dev/null
  grep -hE "ERROR SUMMARY|RACECHECK SUMMARY" "$out"/sanitizer.log "$out"/schedules_*.log 2>/dev/null
  for table in ops models overhead sweeps breakdown; do
    [ -f "$tables/$table.md" ] && { echo; cat "$tables/$table.md"; }
  done
  if [ -f "$tables/host.txt" ]; then
    echo
    echo '```'
    sed -n '1,/^$/p' "$tables/host.txt"   # the host-cost table; the profiles are in bench.log
    echo '```'
  fi
  echo
  echo "## Steps"
  echo
  cat "$tables/steps.md"
} > "$out/summary.md"
echo
cat "$tables/steps.md"
! grep -qv "	PASS	" "$steps_tsv"
