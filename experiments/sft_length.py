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

import matplotlib.pyplot as plt

import data
import dpo
import plot
import sample
import sft
from machinery.results import machine, mean_and_sem
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
    result["sft_length"] = sum(s["tokens"] for s in samples["sft"]) / len(samples["sft"])
    result["dpo_length"] = sum(s["tokens"] for s in samples["dpo"]) / len(samples["dpo"])
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
              "floor": loss_floor(), "machine": machine()}
    with open("results/sft-length.json", "w") as f:
        json.dump(record, f, indent=1)
    print("wrote results/sft-length.json")
    draw_gain(record, "results/sft-length.png")
    draw_curves(record, "results/sft-curves.png")


def draw_gain(record, out):
    """What DPO gains (oracle reward, DPO minus SFT) against the SFT run's length, the mean across seeds with one
    standard error across them and each seed as a dot; beside it, the mean reply length of both models."""
    runs, lengths = record["runs"], record["lengths"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(plot.FIGSIZE[0] * 1.2, plot.FIGSIZE[1] * 0.75))
    stats = [mean_and_sem([r["gain"] for r in runs if r["sft_steps"] == n]) for n in lengths]
    left.errorbar(lengths, [m for m, _ in stats], yerr=[e for _, e in stats], fmt="o-", capsize=4, lw=2,
                  label="mean over seeds, +- one standard error")
    left.plot([r["sft_steps"] for r in runs], [r["gain"] for r in runs], ".", color="gray", label="one seed")
    left.axhline(0, color="black", lw=0.8)
    left.set_ylabel("gain in oracle reward: DPO minus SFT")
    for key, name in (("sft_length", "the SFT model"), ("dpo_length", "DPO from it")):
        stats = [mean_and_sem([r[key] for r in runs if r["sft_steps"] == n]) for n in lengths]
        right.errorbar(lengths, [m for m, _ in stats], yerr=[e for _, e in stats], fmt="o-", capsize=4, label=name)
    right.set_ylabel("mean reply length (tokens)")
    for ax in (left, right):
        ax.set_xlabel("SFT length (optimizer steps, each run's own cosine schedule)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"The demo's DPO from SFT models of each length, {len(record['seeds'])} seeds each", fontsize=10)
    plot.save(fig, out)


def draw_curves(record, out):
    """SFT's held-out loss along each run (log scale), and the data's floor."""
    runs, floor = record["runs"], record["floor"]
    fig, ax = plt.subplots(figsize=plot.FIGSIZE)
    colors = dict(zip(record["lengths"], plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for r in runs:
        steps, losses = zip(*r["sft_curve"])
        ax.plot(steps, losses, "-", color=colors[r["sft_steps"]], lw=1, alpha=0.8,
                label=f"{r['sft_steps']}-step schedule" if r["seed"] == runs[0]["seed"] else None)
    ax.axhline(floor["nats"], color="gray", ls="--", lw=1.2, label=f"the data's floor: ln {floor['choices']} nats "
               f"(2 tones x 5 openers x 5 closers) over {floor['tokens']:.1f} tokens")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("SFT held-out loss per reply token (nats)")
    ax.set_title("SFT on both tones: held-out loss along each run", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    plot.save(fig, out)


if __name__ == "__main__":
    main()
