#!/usr/bin/env bash
# The SFT-length experiment: does a longer SFT leave DPO less to gain? Only the SFT length varies:
# the same target, data and schedule shape (the demo's: 20 warmup steps, cosine decay to the run's
# own end), then the same DPO run (the demo's: beta 0.1, lr 2e-5, 80 steps) from each SFT model, and
# both sampled on all 200 held-out toy prompts. Seeds change the SFT and DPO runs (init and batch
# order); sample.py's seed stays the same, so every model answers the same prompts with the same seeds.
#
#   bash experiments/sft-length.sh                          # the runs below -> results/sft-length.{json,md,png}
#   RUNS="both 600 1" bash experiments/sft-length.sh        # another run (runs already done are skipped)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=out/sft-length
# TARGET STEPS SEED, one run each: what results/sft-length.md reports (the 1,000-step runs: one seed)
RUNS=${RUNS:-"chosen 25 1, chosen 25 2, chosen 60 1, chosen 60 2, chosen 150 1, chosen 150 2,
  chosen 400 1, chosen 400 2, chosen 1000 1,
  both 25 1, both 25 2, both 60 1, both 60 2, both 150 1, both 150 2, both 300 1, both 300 2, both 1000 1"}

echo "$RUNS" | tr ',' '\n' | while read -r target n seed; do
  [ -z "$target" ] && continue
  run=$OUT/$target-$n-seed$seed
  [ -f $run/samples.json ] && continue  # done; a run cut short is redone from the start
  rm -rf $run
  python sft.py --demo --target $target --max_iters $n --lr_decay_iters $n --eval_interval 0 \
    --seed $seed --out_dir $run/sft < /dev/null
  python dpo.py --demo --beta 0.1 --lr 2e-5 --max_iters 80 --init $run/sft --seed $seed --out_dir $run/dpo < /dev/null
  python sample.py --demo --model sft=$run/sft --model dpo=$run/dpo --num_prompts 200 --show 0 \
    --name samples --results_dir $run < /dev/null
done

# per run and across seeds -> results/sft-length.json and .md; then the figure
[ -n "${NO_SUMMARY:-}" ] && exit 0
python -m experiments.sft_length $OUT
python plot.py sft-length results/sft-length.json --out results/sft-length.png \
  --title "SFT length vs what DPO gains (toy task; DPO: beta 0.1, lr 2e-5, 80 steps)"
