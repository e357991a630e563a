#!/usr/bin/env bash
# The loss comparison of gin/experiments/loss_comparison_cpu.gin: BC, then GOLD, BVMPO, OAC and
# RAFT++ (raft_pp).
# The later runs start from a copy of the first run's BC phase and Grow dataset (the loop skips a
# finished phase and a complete Grow step), so every loss improves the same BC policy on the
# same D_g. Usage: launch/loss_comparison_cpu.sh [WORKROOT]   (default: workdirs)
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:-workdirs}
gin=gin/experiments/loss_comparison_cpu.gin
mkdir -p "$root"

run() {
  local name=$1
  shift
  /usr/bin/time -f "loss_$name wall %e s, peak RSS %M KB" \
    env PYTHONPATH="$PWD" python -m rest_jax.cli.main run --workdir "$root/loss_$name" --gin_file "$gin" "$@" \
    --no_progress > "$root/loss_$name.log" 2>&1
  tail -n 1 "$root/loss_$name.log"
}

run bc
for loss in gold bvmpo oac raft_pp; do
  dir="$root/loss_$loss"
  if [ ! -e "$dir/phases/bc.json" ]; then
    mkdir -p "$dir/checkpoints" "$dir/phases" "$dir/grow"
    cp -r "$root/loss_bc/checkpoints/bc" "$dir/checkpoints/"
    cp -r "$root/loss_bc/grow/g001" "$dir/grow/"
    cp "$root/loss_bc/phases/bc.json" "$dir/phases/"
  fi
  run "$loss" --gin_file "gin/losses/$loss.gin"
done
