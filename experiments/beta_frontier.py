"""Beta, measured: oracle reward against KL from the SFT model as DPO trains, for several betas at the demo's
learning rate and one at a fifth of it. Each run is copied after each of STEPS and continued with --resume
(exact: DPO's learning rate is constant after its warmup), so a family's points lie on one training run;
every copy is sampled on all 200 held-out prompts. The runs' logs (an evaluation every 10 steps) also draw
the healthy-against-runaway training curves.

    python -m experiments.beta_frontier     # -> results/beta-frontier.json, .png and results/dpo-lr-curves.png
"""
import json
import os
import shutil

import dpo
import plot
import sample
import sft

OUT = "out/beta-frontier"
SFT = f"{OUT}/sft"
STEPS = (20, 40, 60, 80)
FAMILIES = {f"beta{beta:g}": ["--beta", str(beta)] for beta in (0.1, 0.5, 1.0, 2.0, 5.0)}  # the demo's lr, 1e-4
FAMILIES["beta0.1-lr2e-5"] = ["--beta", "0.1", "--lr", "2e-5"]


def main():
    os.makedirs(OUT, exist_ok=True)
    if not os.path.isfile(f"{SFT}/ckpt.pt"):
        sft.main(["--demo", "--out_dir", SFT])
    models = [f"--model=sft={SFT}"]
    for family, flags in FAMILIES.items():
        run = f"{OUT}/{family}/run"
        shutil.rmtree(f"{OUT}/{family}", ignore_errors=True)
        for i, step in enumerate(STEPS):
            dpo.main(["--demo", "--init", SFT, "--max_iters", str(step), "--eval_interval", "10", "--out_dir", run]
                     + flags + (["--resume"] if i else []))
            shutil.copytree(run, f"{OUT}/{family}/step{step}")
            models.append(f"--model={family}@{step}={OUT}/{family}/step{step}")
    sample.main(["--demo"] + models + ["--num_prompts", "200", "--results_dir", OUT, "--name", "beta-frontier",
                                        "--show", "0"])
    with open(f"{OUT}/beta-frontier.json") as f:
        record = json.load(f)
    # the committed copy keeps what the figure and tables need: each sample's reward, KL and length
    record["samples"] = {label: [{"reward": s["reward"], "kl": round(s["kl"], 4), "tokens": s["tokens"]} for s in rows]
                         for label, rows in record["samples"].items()}
    record["steps"], record["families"] = STEPS, FAMILIES
    # the held-out evaluations of each family's run (every 10 steps): the curves' numbers
    record["curves"] = {family: [{k: v for k, v in r.items() if k == "iter" or "/" in k or k == "loss"}
                                 for r in plot.read_log(f"{OUT}/{family}/run") if r["split"] == "test"]
                        for family in FAMILIES}
    with open("results/beta-frontier.json", "w") as f:
        json.dump(record, f, separators=(",", ":"))
    plot.main(["frontier", "results/beta-frontier.json", "--log_kl", "--out", "results/beta-frontier.png", "--title",
               "DPO from the demo's SFT model: five betas at the demo's lr 1e-4, and beta 0.1 at lr 2e-5"])
    plot.main(["curves", f"lr 1e-4 (the demo's)={OUT}/beta0.1/run", f"lr 2e-5={OUT}/beta0.1-lr2e-5/run",
               "--out", "results/dpo-lr-curves.png", "--title", f"DPO on the toy task, beta 0.1, {STEPS[-1]} steps: two learning rates"])


if __name__ == "__main__":
    main()
