#!/usr/bin/env bash
# ReST with a learned reward model on numbers_de_en (docs/rewards.md: the numbers recipe).
#  1. the default experiment (its BC, g1 and g2 policies generate the reward model's data),
#  2. 96k more chrF-scored samples of those policies (launch/numbers_reward_pairs.py),
#  3. encode and split them with the workdir's own Grow records (train-reward --export_arrays),
#  4. fit the `small` reward model (1.2M parameters; 12k steps of 256: about 2.5 min on an H200,
#     hours on a 2-core CPU; run this step on an accelerator host, FIT_ONLY=1 skips the others),
#  5. ReST with reward = 'learned:workdirs/reward_models/numbers_small' (2-core CPU).
# Usage: launch/numbers_learned_reward.sh [WORKROOT]   (default: workdirs)
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:-workdirs}
export PYTHONPATH="$PWD" TF_CPP_MIN_LOG_LEVEL=2
rm_dir=$root/reward_models/numbers_small
arrays=$root/reward_models/numbers_pairs.npz
mkdir -p "$root/reward_models"
if [ "${FIT_ONLY:-0}" != 1 ]; then
  if [ ! -e "$root/numbers_de_en/phases/g002_i02.json" ]; then
    python -m rest_jax.cli.main run --workdir "$root/numbers_de_en" \
      --gin_file gin/experiments/numbers_de_en_cpu.gin --no_progress
  fi
  pairs=$root/reward_models/numbers_pairs.jsonl
  if [ ! -e "$pairs.done" ]; then
    rm -f "$pairs"
    python launch/numbers_reward_pairs.py "$root/numbers_de_en" "$pairs" \
      --phases bc,g1_i2,g2_i2 --temps 0.7,1.1 --num_prompts 8000 --num_samples 2
    touch "$pairs.done"
  fi
  [ -e "$arrays" ] || python -m rest_jax.cli.main train-reward --data "$root/numbers_de_en" "$pairs" \
    --output_dir "$rm_dir" --model small --export_arrays "$arrays"
fi
[ -e "$rm_dir/reward_model.json" ] || python launch/fit_reward_arrays.py "$arrays" "$rm_dir" \
  --preset small --num_steps 12000 --batch_size 256 --learning_rate 1e-3 --warmup_steps 500 \
  --weight_decay 0.01 --eval_every 2000 --steps_per_call 100
[ "${FIT_ONLY:-0}" = 1 ] && exit 0
python -m rest_jax.cli.main run --workdir "$root/numbers_learned" \
  --gin_file gin/experiments/numbers_learned_reward_cpu.gin --no_progress \
  --gin.config.RunConfig.reward="'learned:$rm_dir'"
