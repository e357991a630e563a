#!/usr/bin/env bash
# The threshold-schedule comparison of gin/experiments/schedule_comparison_cpu.gin: BC, Grow g1
# and three Improve steps with each of the five schedules. The first run (fixed) does BC and the
# Grow step; the other four start from a copy of its BC phase and Grow dataset (the loop skips a
# finished phase and a complete Grow step), so every schedule filters the same D_g sampled from
# the same BC policy. Then `rest-jax compare` prints the table and plots the five runs.
# Usage: launch/schedule_comparison_cpu.sh [WORKROOT]   (default: workdirs)
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:-workdirs}
gin=gin/experiments/schedule_comparison_cpu.gin
mkdir -p "$root"

# A schedule that fails (e.g. a threshold that keeps nothing) is reported and left out of the
# table; the others still run. The script exits 1 if any failed.
done_dirs=()
failed=()
run() {
  local name=$1 rc=0
  /usr/bin/time -f "sched_$name wall %e s, peak RSS %M KB" \
    env PYTHONPATH="$PWD" python -m rest_jax.cli.main run --workdir "$root/sched_$name" \
    --gin_file "$gin" --gin.config.ImproveConfig.schedule="'$name'" \
    --no_progress > "$root/sched_$name.log" 2>&1 || rc=$?
  tail -n 1 "$root/sched_$name.log"
  if [ "$rc" -eq 0 ]; then done_dirs+=("$root/sched_$name"); else failed+=("$name (exit $rc)"); fi
}

run fixed
[ -e "$root/sched_fixed/grow/g001/COMPLETED" ] || { echo "sched_fixed did not finish Grow g1"; exit 1; }
for schedule in quantile linear per_source_percentile per_source_interpolation; do
  dir="$root/sched_$schedule"
  if [ ! -e "$dir/phases/bc.json" ]; then
    mkdir -p "$dir/checkpoints" "$dir/phases" "$dir/grow"
    cp -r "$root/sched_fixed/checkpoints/bc" "$dir/checkpoints/"
    cp -r "$root/sched_fixed/grow/g001" "$dir/grow/"
    cp "$root/sched_fixed/phases/bc.json" "$dir/phases/"
  fi
  run "$schedule"
done
if [ "${#done_dirs[@]}" -gt 0 ]; then
  PYTHONPATH="$PWD" python -m rest_jax.cli.main compare "${done_dirs[@]}" \
    --out "$root/schedule_comparison.png" | tee "$root/schedule_comparison.txt"
fi
if [ "${#failed[@]}" -gt 0 ]; then
  echo "failed: ${failed[*]} (see $root/sched_<name>.log)"
  exit 1
fi
