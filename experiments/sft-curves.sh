#!/usr/bin/env bash
# SFT loss curves on the toy task: the demo's SFT (target both, 300 steps) and a long SFT on the
# chosen replies alone (a 2,000-step cosine schedule, run to step 1,050 with an evaluation every 25
# steps), which shows where the held-out loss flattens: at the floor the data's randomness sets (5
# openers x 5 closers per reply, x 2 tones for target both), with no over-fitting by step 1,050.
#
#   bash experiments/sft-curves.sh   # -> results/sft-curves.png
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f out/demo/sft/ckpt.pt ] || python sft.py --demo --eval_interval 20 --out_dir out/demo/sft
rm -rf out/sft-probe
python sft.py --demo --target chosen --max_iters 1050 --lr_decay_iters 2000 --eval_interval 25 --out_dir out/sft-probe
python plot.py curves "demo SFT (target both, 300 steps)=out/demo/sft" \
  "target chosen (2,000-step schedule, to step 1,050)=out/sft-probe" \
  --hline "0.189:floor for target both (ln 50 nats over 20.7 tokens)" \
  --hline "0.155:floor for target chosen (ln 25 nats over 20.8 tokens)" \
  --out results/sft-curves.png --title "SFT on the toy task from scratch (2 layers x 64): train and held-out loss"
