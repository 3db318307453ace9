"""Collect the SFT-length runs (experiments/sft-length.sh) into results/sft-length.json and .md.

    python -m experiments.sft_length out/sft-length

Each run directory TARGET-LENGTH-seedS holds sft/log.jsonl, dpo/log.jsonl and samples.json (sample.py).
Per run: the SFT test loss, both models' oracle reward and the gain (standard errors over the 200
samples; the gain's is paired, prompt by prompt), the KL DPO spent, and the mechanism: the reference's
held-out log-probs (DPO's step-0 evaluation, where policy = reference) and where DPO's loss and
log-probs ended. The table then gives mean +- standard error across seeds.
"""
import json
import os
import re
import sys

from machinery.results import mean_and_sem
from plot import read_log, series

RUN_NAME = re.compile(r"(?P<target>\w+)-(?P<n>\d+)-seed(?P<seed>\d+)$")


def last(records, key, step=None):
    """The test value of key at `step` (default: the last evaluation)."""
    steps, values = series(records, "test", key)
    return float(values[-1] if step is None else values[list(steps).index(step)])


def collect(run_dir, target, sft_iters, seed):
    sft, dpo = read_log(os.path.join(run_dir, "sft")), read_log(os.path.join(run_dir, "dpo"))
    with open(os.path.join(run_dir, "samples.json")) as f:
        samples = json.load(f)["samples"]
    sft_rewards = [s["reward"] for s in samples["sft"]]
    dpo_rewards = [s["reward"] for s in samples["dpo"]]
    run = dict(target=target, sft_iters=sft_iters, seed=seed, sft_test_loss=last(sft, "loss"))
    run["sft_reward"], run["sft_reward_sem"] = mean_and_sem(sft_rewards)
    run["dpo_reward"], run["dpo_reward_sem"] = mean_and_sem(dpo_rewards)
    run["gain"], run["gain_sem"] = mean_and_sem([b - a for a, b in zip(sft_rewards, dpo_rewards)])
    run["kl"], run["kl_sem"] = mean_and_sem([s["kl"] for s in samples["dpo"]])
    run["sft_share_at_ceiling"] = sum(r == 1.0 for r in sft_rewards) / len(sft_rewards)
    run["sft_mean_tokens"] = mean_and_sem([s["tokens"] for s in samples["sft"]])[0]
    run["dpo_mean_tokens"] = mean_and_sem([s["tokens"] for s in samples["dpo"]])[0]
    # at DPO step 0 the policy is the reference: these are pi_ref's summed log-probs of the held-out responses
    run["ref_logps_chosen"] = last(dpo, "logps/chosen", step=0)
    run["ref_logps_rejected"] = last(dpo, "logps/rejected", step=0)
    for key in ("loss", "rewards/accuracy", "rewards/margin", "logps/chosen", "logps/rejected"):
        run["dpo_end_" + key.replace("/", "_").replace("rewards_", "")] = last(dpo, key)
    return run


COLUMNS = [("sft_test_loss", "SFT test loss", 3), ("sft_reward", "SFT reward", 3), ("dpo_reward", "DPO reward", 3),
           ("gain", "gain", 3), ("kl", "KL spent (nats)", 2), ("ref_logps_chosen", "ref logp chosen", 1),
           ("ref_logps_rejected", "ref logp rejected", 1), ("dpo_end_loss", "DPO test loss at 80", 3),
           ("dpo_end_accuracy", "DPO test accuracy", 2), ("dpo_end_logps_chosen", "logp chosen at 80", 1),
           ("dpo_end_logps_rejected", "logp rejected at 80", 1)]


def table(runs):
    lines = ["| target | SFT steps | seeds | " + " | ".join(name for _, name, _ in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 3) + "|"]
    for target in sorted({r["target"] for r in runs}):
        for n in sorted({r["sft_iters"] for r in runs if r["target"] == target}):
            group = [r for r in runs if r["target"] == target and r["sft_iters"] == n]
            cells = []
            for key, _, digits in COLUMNS:
                mean, sem = mean_and_sem([r[key] for r in group])
                cells.append(f"{mean:.{digits}f} ± {sem:.{digits}f}" if len(group) > 1 else f"{mean:.{digits}f}")
            lines.append(f"| {target} | {n} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_seed_table(runs):
    lines = ["| target | SFT steps | seed | SFT reward | DPO reward | gain (paired, over 200 samples) | KL (nats) |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (r["target"], r["sft_iters"], r["seed"])):
        lines.append(f"| {r['target']} | {r['sft_iters']} | {r['seed']} | {r['sft_reward']:.3f} ± {r['sft_reward_sem']:.3f} "
                     f"| {r['dpo_reward']:.3f} ± {r['dpo_reward_sem']:.3f} | {r['gain']:.3f} ± {r['gain_sem']:.3f} "
                     f"| {r['kl']:.2f} ± {r['kl_sem']:.2f} |")
    return "\n".join(lines)


NOTES = "\n## What it shows"  # a hand-written reading after the tables; kept when they are regenerated


def write_markdown(runs, out_dir, path="results/sft-length.md"):
    notes = ""
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
        notes = text[text.index(NOTES):] if NOTES in text else ""
    lengths = " ".join(str(n) for n in sorted({r["sft_iters"] for r in runs}))
    with open(path, "w") as f:
        f.write(f"""# SFT length against what DPO gains (toy task)

Only the SFT length varies: same data and target, the demo's schedule shape (20 warmup steps, cosine
decay to lr/10 at the run's own end), SFT lengths {lengths} steps; then the demo's DPO run from each
SFT model (beta 0.1, lr 2e-5, 80 steps, batch 16) with the same seed as its SFT; then both models
sampled on all 200 held-out prompts (one completion each, temperature 1, sample.py's seed 1337).

```
bash experiments/sft-length.sh      # per target, length and seed:
python sft.py --demo --target TARGET --max_iters N --lr_decay_iters N --eval_interval 0 --seed S --out_dir {out_dir}/TARGET-N-seedS/sft
python dpo.py --demo --beta 0.1 --lr 2e-5 --max_iters 80 --init {out_dir}/TARGET-N-seedS/sft --seed S --out_dir {out_dir}/TARGET-N-seedS/dpo
python sample.py --demo --model sft=.../sft --model dpo=.../dpo --num_prompts 200 --show 0 --name samples --results_dir {out_dir}/TARGET-N-seedS
python -m experiments.sft_length {out_dir}   # -> results/sft-length.json (per seed) and this table
python plot.py sft-length results/sft-length.json --out results/sft-length.png
```

Columns: SFT test loss (per response token, on its own target's held-out responses; the floor set by
the data's randomness is ln 25 / 20.8 = 0.155 for target chosen and ln 50 / 20.7 = 0.189 for both);
oracle reward (data.toy_reward, mean over 200 samples) of the SFT model and of DPO from it; the gain,
their difference; the KL DPO spent (nats, on its own samples, against its SFT model); the reference's
summed log-probs of the held-out chosen and rejected responses (DPO's step-0 evaluation); DPO's test
loss, accuracy and log-probs after its 80 steps.

## Mean ± standard error across seeds

{table(runs)}

## Per seed (± standard error over the 200 samples; the gain's is paired by prompt)

{per_seed_table(runs)}
""")
        f.write(notes)


def main(out_dir):
    runs = []
    for name in sorted(os.listdir(out_dir)):
        match = RUN_NAME.match(name)
        if match and os.path.exists(os.path.join(out_dir, name, "samples.json")):
            runs.append(collect(os.path.join(out_dir, name), match["target"], int(match["n"]), int(match["seed"])))
    with open("results/sft-length.json", "w") as f:
        json.dump({"source": "bash experiments/sft-length.sh; python -m experiments.sft_length " + out_dir, "runs": runs}, f, indent=1)
    write_markdown(runs, out_dir)
    print(table(runs))
    print(f"\n{len(runs)} runs -> results/sft-length.json, results/sft-length.md")


if __name__ == "__main__":
    main(sys.argv[1])
