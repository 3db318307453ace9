"""How long to train SFT, measured: does a longer SFT leave DPO less to gain?

Only the SFT length varies: the demo's SFT (target both, its schedule's shape: warmup, then a cosine decay
to the run's own end) for each of LENGTHS steps, three seeds each; then the demo's DPO run from every SFT
model; both models sampled on all 200 held-out toy prompts. A seed changes the SFT and DPO runs (weights,
batch order); sample.py's seed stays, so every model answers the same prompts with the same draws, and the
gain (DPO minus SFT, oracle reward) is paired prompt by prompt. SFT is evaluated every 50 steps, which draws
its held-out curve.

    python -m experiments.sft_length        # every run -> results/sft-length.json and results/sft-length.png
"""
import json
import math
import os
import shutil

import data
import dpo
import sample
import plot
import sft
from machinery.results import mean_and_sem
from plot import read_log, series

OUT = "out/sft-length"
LENGTHS = (150, 300, 500, 700, 1000)
SEEDS = (1, 2, 3)
RUNS = [(steps, seed) for steps in LENGTHS for seed in SEEDS]  # exactly the runs results/sft-length.json holds


def last(records, split, key, step=None):
    steps, values = series(records, split, key)
    return float(values[-1] if step is None else values[list(steps).index(step)])


def one_run(steps, seed):
    """SFT, then the demo's DPO, then both sampled; the run's numbers."""
    run = f"{OUT}/both-{steps}-seed{seed}"
    if not os.path.isfile(f"{run}/samples.json"):  # done already: a rerun of the experiment skips it
        shutil.rmtree(run, ignore_errors=True)
        sft.main(["--demo", "--max_iters", str(steps), "--eval_interval", "50", "--eval_batches", "4",
                  "--seed", str(seed), "--out_dir", f"{run}/sft"])
        dpo.main(["--demo", "--init", f"{run}/sft", "--seed", str(seed), "--out_dir", f"{run}/dpo"])
        sample.main(["--demo", "--model", f"sft={run}/sft", "--model", f"dpo={run}/dpo", "--num_prompts", "200",
                     "--show", "0", "--results_dir", run])
    with open(f"{run}/samples.json") as f:
        samples = json.load(f)["samples"]
    sft_log, dpo_log = read_log(f"{run}/sft"), read_log(f"{run}/dpo")
    sft_rewards, dpo_rewards = [s["reward"] for s in samples["sft"]], [s["reward"] for s in samples["dpo"]]
    result = dict(sft_steps=steps, seed=seed, sft_test_loss=last(sft_log, "test", "loss"),
                  sft_curve=[[int(s), float(v)] for s, v in zip(*series(sft_log, "test", "loss"))])
    result["sft_reward"], result["sft_reward_se"] = mean_and_sem(sft_rewards)
    result["dpo_reward"], result["dpo_reward_se"] = mean_and_sem(dpo_rewards)
    result["gain"], result["gain_se"] = mean_and_sem([b - a for a, b in zip(sft_rewards, dpo_rewards)])
    result["kl"], result["kl_se"] = mean_and_sem([s["kl"] for s in samples["dpo"]])
    # at DPO's step 0 the policy is the reference: its summed log-probs of the held-out replies
    result["ref_logps_chosen"] = last(dpo_log, "test", "logps/chosen", step=0)
    result["ref_logps_rejected"] = last(dpo_log, "test", "logps/rejected", step=0)
    result["dpo_margin"] = last(dpo_log, "test", "rewards/margin")
    return result


def loss_floor():
    """The lowest held-out loss an SFT model of both tones can reach: a toy reply is one of 2 tones x 5 openers x
    5 closers, equally likely, so each holds ln 50 nats, spread over its tokens (EOS included)."""
    choices = 2 * len(data.TOY_POLITE[0]) * len(data.TOY_POLITE[1])
    pairs = data.tokenize_pairs(data.toy_pairs("test"), sft.DEMO["max_len"], sft.DEMO["max_len"] // 2, verbose=False)
    tokens = [len(p[reply]) for p in pairs for reply in ("chosen", "rejected")]
    return {"choices": choices, "tokens": sum(tokens) / len(tokens), "nats": math.log(choices) * len(tokens) / sum(tokens)}


def main():
    os.makedirs(OUT, exist_ok=True)
    runs = [one_run(steps, seed) for steps, seed in RUNS]
    record = {"lengths": LENGTHS, "seeds": SEEDS, "dpo": {k: v for k, v in dpo.DEMO.items()}, "runs": runs,
              "floor": loss_floor()}
    with open("results/sft-length.json", "w") as f:
        json.dump(record, f, indent=1)
    print("wrote results/sft-length.json")
    plot.main(["sft-length", "results/sft-length.json", "--out", "results/sft-length.png"])
    plot.main(["sft-curves", "results/sft-length.json", "--out", "results/sft-curves.png"])


if __name__ == "__main__":
    main()
