#!/usr/bin/env bash
# The beta frontier on the toy task: oracle reward against KL from the SFT model, for five betas at
# lr 1e-4 (where beta matters) and the demo's lr 2e-5 at beta 0.1, each sampled after 20, 40, 60 and
# 80 DPO steps. A run is stopped at each checkpoint step, copied, and resumed (--resume with a higher
# --max_iters continues the same run exactly: DPO's lr is constant after warmup), so the four points
# of a family lie on one training run. Its logs (--eval_interval 10) also give results/dpo-lr-curves.png.
#
#   bash experiments/beta-frontier.sh        # from the repository root or anywhere; writes results/beta-frontier.*
set -euo pipefail
cd "$(dirname "$0")/.."
SFT=out/demo/sft                 # the demo SFT model (python sft.py --demo)
OUT=out/beta-frontier
STEPS="20 40 60 80"

[ -f $SFT/ckpt.pt ] || python sft.py --demo --out_dir $SFT
models=()
family() {  # family NAME DPO_FLAGS...: one DPO run, copied at each of $STEPS
  local name=$1 dir=$OUT/$1/run resume=""
  shift
  rm -rf $OUT/$name  # a fresh run each time: dpo.py refuses to start over an existing one
  for step in $STEPS; do
    python dpo.py --demo --init $SFT "$@" --max_iters $step --eval_interval 10 --out_dir $dir $resume
    rm -rf $OUT/$name/step$step && cp -r $dir $OUT/$name/step$step
    models+=(--model "$name@$step=$OUT/$name/step$step")
    resume=--resume
  done
}
for beta in 0.05 0.1 0.25 0.5 1.0; do
  family beta$beta-lr1e-4 --beta $beta --lr 1e-4
done
family beta0.1-lr2e-5 --beta 0.1 --lr 2e-5

# one completion per held-out prompt (all 200), KL and accuracy against the SFT model
python sample.py --demo --model sft=$SFT "${models[@]}" --num_prompts 200 --name beta-frontier --results_dir $OUT
# the committed copy keeps what the figure and table need: per-sample reward, KL and length
python - <<'PY'
import json
record = json.load(open("out/beta-frontier/beta-frontier.json"))
record["samples"] = {label: [{"reward": s["reward"], "kl": round(s["kl"], 4), "tokens": s["tokens"]} for s in rows]
                     for label, rows in record["samples"].items()}
json.dump(record, open("results/beta-frontier.json", "w"), separators=(",", ":"))
PY
python plot.py frontier results/beta-frontier.json --out results/beta-frontier.png \
  --title "DPO from the demo SFT model, toy task: 5 betas at lr 1e-4 and beta 0.1 at lr 2e-5, 80 steps"
{
  echo "# The beta frontier (toy task): \`bash experiments/beta-frontier.sh\`"
  echo
  echo "DPO from the demo SFT model (\`python sft.py --demo\`), 80 steps, checkpoints copied at $STEPS:"
  echo "\`python dpo.py --demo --beta BETA --lr 1e-4 --eval_interval 10\` for beta 0.05, 0.1, 0.25, 0.5, 1.0, and"
  echo "the demo's \`python dpo.py --demo --beta 0.1 --eval_interval 10\` (lr 2e-5); labels FAMILY@STEP."
  echo "Sampled with \`python sample.py --demo --model sft=out/demo/sft --model LABEL=DIR ... --num_prompts 200\`:"
  echo "one completion per held-out prompt, reference = the SFT model. Figure: results/beta-frontier.png."
  echo
  python -m experiments.error_bars results/beta-frontier.json | tail -n +2
} > results/beta-frontier.md
python plot.py curves "lr 2e-5 (demo)=$OUT/beta0.1-lr2e-5/run" "lr 1e-4=$OUT/beta0.1-lr1e-4/run" \
  --out results/dpo-lr-curves.png --title "DPO on the toy task, beta 0.1: healthy (lr 2e-5) vs runaway (lr 1e-4)"
