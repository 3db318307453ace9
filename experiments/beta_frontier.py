"""Beta, measured: oracle reward, KL from the SFT model and reply length as DPO trains, for several betas at the
demo's learning rate and one at a lower one, each from three seeds' SFT models.

For every seed: the demo's SFT (seeded), then each family's DPO run (seeded), copied after each of STEPS and
continued with --resume (exact: DPO's learning rate is constant after its warmup), so a family's points lie on
one training run; every copy is sampled on all 200 held-out prompts. A cell of the README's table is the mean
over the seeds and its standard error across them. The runs' logs (an evaluation every 10 steps, and every
training step's gradient norm) draw the training curves of section 6 and measure the pull.

    python -m experiments.beta_frontier     # -> results/beta-frontier.json, .png, results/dpo-lr-curves.png
"""
import json
import os
import shutil

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import dpo  # noqa: E402
import plot  # noqa: E402
import sample  # noqa: E402
import sft  # noqa: E402
from machinery.results import machine, mean_and_sem  # noqa: E402

OUT = "out/beta-frontier"
SEEDS = (1, 2, 3)
STEPS = (20, 40, 60, 80)
LOW_LR = 2e-5
FAMILIES = {f"beta{beta:g}": ["--beta", str(beta)] for beta in (0.1, 0.5, 1.0, 2.0, 5.0)}  # the demo's lr
FAMILIES[f"beta0.1-lr{LOW_LR:g}"] = ["--beta", "0.1", "--lr", str(LOW_LR)]
PROMPTS = 200


def one_seed(seed):
    """The seed's SFT model and every family's run, copied at each of STEPS and sampled: sample.py's record."""
    root = f"{OUT}/seed{seed}"
    if not os.path.isfile(f"{root}/sft/ckpt.pt"):
        shutil.rmtree(root, ignore_errors=True)
        sft.main(["--demo", "--seed", str(seed), "--out_dir", f"{root}/sft"])
    models = [f"--model=sft={root}/sft"]
    for family, flags in FAMILIES.items():
        run = f"{root}/{family}/run"
        if not os.path.isfile(f"{root}/{family}/step{STEPS[-1]}/ckpt.pt"):
            shutil.rmtree(f"{root}/{family}", ignore_errors=True)
            for i, step in enumerate(STEPS):
                dpo.main(["--demo", "--init", f"{root}/sft", "--seed", str(seed), "--max_iters", str(step),
                          "--eval_interval", "10", "--out_dir", run] + flags + (["--resume"] if i else []))
                shutil.copytree(run, f"{root}/{family}/step{step}")
        models += [f"--model={family}@{step}={root}/{family}/step{step}" for step in STEPS]
    if not os.path.isfile(f"{root}/beta-frontier.json"):
        sample.main(["--demo", *models, "--num_prompts", str(PROMPTS), "--results_dir", root, "--name",
                     "beta-frontier", "--show", "0"])
    with open(f"{root}/beta-frontier.json") as f:
        return json.load(f)


def main():
    os.makedirs(OUT, exist_ok=True)
    records = {seed: one_seed(seed) for seed in SEEDS}
    # per model label: each seed's mean reward, its sampling error, KL and length
    points = {label: [{"reward": record["summary"][label]["oracle_reward"],
                       "reward_se": record["summary"][label]["oracle_reward_se"],
                       "kl": record["summary"][label]["kl"], "length": record["summary"][label]["mean_length"]}
                      for record in records.values()] for label in records[SEEDS[0]]["summary"]}
    curves = {family: {seed: [{k: v for k, v in r.items() if k in ("iter", "split", "loss", "grad_norm") or "/" in k}
                              for r in plot.read_log(f"{OUT}/seed{seed}/{family}/run")]
                       for seed in SEEDS} for family in FAMILIES}
    record = {"seeds": SEEDS, "steps": STEPS, "families": FAMILIES, "prompts": PROMPTS, "lr": dpo.DEMO["lr"],
              "low_lr": LOW_LR, "points": points, "curves": curves, "machine": machine()}
    with open("results/beta-frontier.json", "w") as f:
        json.dump(record, f, separators=(",", ":"))
    draw(record, "results/beta-frontier.png")
    plot.main(["curves"] + [f"lr {dpo.DEMO['lr']:g}, seed {seed}={OUT}/seed{seed}/beta0.1/run" for seed in SEEDS]
              + [f"lr {LOW_LR:g}, seed {seed}={OUT}/seed{seed}/beta0.1-lr{LOW_LR:g}/run" for seed in SEEDS]
              + ["--out", "results/dpo-lr-curves.png", "--title",
                 f"DPO on the toy task, beta 0.1, {STEPS[-1]} steps: two learning rates, three seeds each"])


def draw(record, out):
    """Left: oracle reward against KL, each family's mean over the seeds along its steps (bars: one standard
    error across the seeds). Right: the mean reply length along the same steps."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(plot.FIGSIZE[0] * 1.2, plot.FIGSIZE[1]))
    sft_point = record["points"]["sft"]
    for family, color in zip(record["families"], plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        cells = [record["points"]["sft"]] + [record["points"][f"{family}@{step}"] for step in record["steps"]]
        kl = [mean_and_sem([p["kl"] for p in cell]) for cell in cells]
        reward = [mean_and_sem([p["reward"] for p in cell]) for cell in cells]
        length = [mean_and_sem([p["length"] for p in cell]) for cell in cells]
        left.errorbar([k for k, _ in kl], [r for r, _ in reward], xerr=[e for _, e in kl], yerr=[e for _, e in reward],
                      fmt="o-", color=color, capsize=3, label=family.replace("beta", "beta ").replace("-lr", ", lr "))
        right.errorbar([0, *record["steps"]], [m for m, _ in length], yerr=[e for _, e in length], fmt="o-",
                       color=color, capsize=3)
    right.axhline(sum(p["length"] for p in sft_point) / len(sft_point), color="gray", ls="--", lw=1,
                  label="the SFT model")
    left.set_xscale("symlog", linthresh=0.1)
    left.set_xlabel("KL(policy || SFT model) on its own samples (nats; linear below 0.1)")
    left.set_ylabel(f"oracle reward (mean over {record['prompts']} held-out prompts)")
    right.set_xlabel("DPO step")
    right.set_ylabel("mean reply length (tokens)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"DPO from the demo's SFT model: steps {', '.join(map(str, record['steps']))}; mean over "
                 f"{len(record['seeds'])} seeds, bars one standard error across them", fontsize=10)
    plot.save(fig, out)


if __name__ == "__main__":
    main()
