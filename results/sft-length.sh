#!/usr/bin/env bash
# The SFT-length experiment: does a longer SFT leave DPO less to gain? Only the SFT length varies:
# the same target, data and schedule shape (the demo's: 20 warmup steps, cosine decay to the run's
# own end), then the same DPO run (the demo's: beta 0.1, lr 2e-5, 80 steps) from each SFT model,
# and both sampled on all 200 held-out toy prompts. Seeds change the SFT and DPO runs (init and batch
# order); sample.py's seed stays the same, so every model answers the same prompts with the same seeds.
#
#   bash results/sft-length.sh                              # everything -> results/sft-length.*
#   TARGETS=chosen SEEDS="1 2" bash results/sft-length.sh   # a part (runs already done are skipped)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=out/sft-length
TARGETS=${TARGETS:-"chosen both"}
LENGTHS=${LENGTHS:-"25 60 150 400 1000"}
SEEDS=${SEEDS:-"1 2 3"}

for target in $TARGETS; do
  for n in $LENGTHS; do
    for seed in $SEEDS; do
      run=$OUT/$target-$n-seed$seed
      [ -f $run/samples.json ] && continue  # done; a run cut short is redone from the start
      rm -rf $run
      python sft.py --demo --target $target --max_iters $n --lr_decay_iters $n --eval_interval 0 \
        --seed $seed --out_dir $run/sft
      python dpo.py --demo --beta 0.1 --lr 2e-5 --max_iters 80 --init $run/sft --seed $seed --out_dir $run/dpo
      python sample.py --demo --model sft=$run/sft --model dpo=$run/dpo --num_prompts 200 --show 0 \
        --name samples --results_dir $run
    done
  done
done

# per run and across seeds -> results/sft-length.json and .md; then the figure
[ -n "${NO_SUMMARY:-}" ] && exit 0
python results/sft-length.py $OUT
python plot.py sft-length results/sft-length.json --out results/sft-length.png \
  --title "SFT length vs what DPO gains (toy task; DPO: beta 0.1, lr 2e-5, 80 steps)"
