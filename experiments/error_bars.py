"""Error bars for sample tables: mean +- standard error over samples, from sample.py's JSON files.

    python -m experiments.error_bars results/demo.json results/beta-sweep.json results/beta-frontier.json \
        > results/error-bars.md

Every model in one file got the same prompts and, per prompt, the same sampling seed, so two models'
samples are paired: the standard error of a *difference* comes from the per-prompt differences, which is
tighter than combining the two models' own errors when the samples move together.
"""
import json
import os
import sys

from machinery.results import mean_and_sem


def fmt(mean, sem):
    return f"{mean:.3f} ± {sem:.3f}"


def paired(rewards, baseline):
    """Mean +- standard error of the per-prompt reward differences; empty for the baseline itself."""
    if baseline is None:
        return ""
    mean, sem = mean_and_sem([a - b for a, b in zip(rewards, baseline)])
    return f"{fmt(mean, sem)} ({mean / sem:+.1f} SE)" if sem > 0 else f"{mean:.3f} ± 0 (equal on every prompt)"


def main(paths):
    print("# Oracle reward and KL: mean ± standard error over samples\n")
    print(f"`python -m experiments.error_bars {' '.join(paths)}`\n")
    print("Mean ± one standard error over the samples (one completion per held-out prompt). Paired")
    print("differences are computed per prompt (same prompt and sampling seed), against the first row")
    print("(the reference model) and against the previous row (for labels FAMILY@STEP: the same family's")
    print("previous checkpoint); (k SE) is the difference over its error.")
    print("These errors cover the sampling noise only: each model is one training run (one seed).\n")
    for path in paths:
        with open(path) as f:
            record = json.load(f)
        samples = record["samples"]
        n = len(next(iter(samples.values())))
        print(f"## {os.path.basename(path)} ({n} prompts, reference `{record['reference']}`)\n")
        print("| model | oracle reward | KL from the reference (nats) | reward minus first row | reward minus previous row |")
        print("|---|---|---|---|---|")
        first = previous = previous_family = None
        for label, rows in samples.items():
            rewards = [row["reward"] for row in rows]
            kls = [row["kl"] for row in rows]
            family = label.rpartition("@")[0]  # FAMILY@STEP: compare with the family's previous checkpoint
            if family and family != previous_family:
                previous = None
            print(f"| {label} | {fmt(*mean_and_sem(rewards))} | {fmt(*mean_and_sem(kls))} | "
                  f"{paired(rewards, first)} | {paired(rewards, previous) if previous is not first else ''} |")
            first = rewards if first is None else first
            previous, previous_family = rewards, family
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
