#!/usr/bin/env bash
# Adaptive sampling budgets against fixed N (gin/experiments/arith_adaptive_cpu.gin): the adaptive
# run (rounds of 2 up to 8 samples, stop at 4 correct), then adaptive with k = 2 and fixed N = 8
# and N = 4 from a copy of its BC phase, so every Grow samples the same BC policy.
# Usage: launch/adaptive_arith_cpu.sh [WORKROOT]   (default: workdirs)
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:-workdirs}
gin=gin/experiments/arith_adaptive_cpu.gin
mkdir -p "$root"

run() {
  local name=$1
  shift
  /usr/bin/time -f "$name wall %e s, peak RSS %M KB" \
    env PYTHONPATH="$PWD" python -m rest_jax.cli.main run --workdir "$root/$name" \
    --gin_file "$gin" "$@" --no_progress > "$root/$name.log" 2>&1
  tail -n 1 "$root/$name.log"
}

share_bc() {
  local dir="$root/$1"
  if [ ! -e "$dir/phases/bc.json" ]; then
    mkdir -p "$dir/checkpoints" "$dir/phases"
    cp -r "$root/adaptive/checkpoints/bc" "$dir/checkpoints/"
    cp "$root/adaptive/phases/bc.json" "$dir/phases/"
  fi
}

run adaptive
share_bc adaptive_k2
run adaptive_k2 --gin.config.AdaptiveConfig.min_passing=2
for n in 8 4; do
  share_bc "fixed$n"
  run "fixed$n" --gin.config.AdaptiveConfig.max_samples=0 \
    --gin.config.SamplingConfig.num_samples=$n
done
