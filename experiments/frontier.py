"""What DPO replaced, measured: the DPO paper's fig. 2 (sec. 6.1) on the toy task, on a CPU.

Every method starts from the same SFT model and sees the same training prompts; each gets the same three
learning rates and the same step budget (STEPS[-1] optimizer steps, or PPO iterations), and is sampled at
STEPS on the same 200 held-out prompts with sample.py's estimator (oracle reward, KL to the SFT model):

    DPO, offline pairs      dpo.py on the toy task's fixed pairs (what public preference data is like)
    DPO, on-policy pairs    dpo.py on pairs of pi_SFT's own samples, labelled by the oracle (the paper's IMDb setup)
    PPO                     rlhf.py: a reward model on the same pairs, then PPO against it (RLHF)
    PPO-GT                  rlhf.py --oracle: PPO on the true reward
    Preferred-FT            sft.py on the chosen replies, from the SFT model
    Best-of-N               N samples of pi_SFT per prompt, the oracle's favourite kept (N = 1 ... 32)

The learning rate is chosen per method by the final oracle reward at the middle beta (or KL coefficient);
at that learning rate the other betas draw the frontier; the best setting then runs with 2 more seeds.
Compute is counted by wrapping GPT.hidden_states: every token through the model, sampling included, and
the tokens that also go backward. Writes results/frontier.json and results/frontier.png; the README's
tables are made from the .json by experiments/tables.py.

    python -m experiments.frontier
"""
import ast
import json
import math
import os
import shutil
import time

import matplotlib.pyplot as plt
import torch

import dpo
import model
import rlhf
import sample
import plot
import sft
from experiments import onpolicy_pairs
from data import get_tokenizer, load_preferences, toy_reward
from machinery.models import open_model
from machinery.results import machine, mean_and_sem

OUT = "out/frontier"
STEPS = (10, 20, 30)              # sampled along every run; the last is the step budget
LRS = (3e-5, 1e-4, 3e-4)          # the same three for every method
BETAS = (0.1, 0.5, 2.0)           # DPO's beta; the first is the one the learning rate is chosen at
KL_COEFS = (0.1, 0.02, 0.5)       # PPO's KL coefficient, likewise
SEEDS = (1337, 1, 2)              # the best setting of each method runs with all three
N_VALUES = (1, 2, 4, 8, 16, 32)   # best-of-N
PROMPTS = 200                     # held-out prompts every model is sampled on
SFT = f"{OUT}/sft"


class Counter:
    """Tokens through the model (GPT.hidden_states), forward only and forward-and-backward, by method."""

    def __init__(self):
        self.tokens, self.method = {}, None
        real = model.GPT.hidden_states

        def counted(gpt, idx, *args, **kwargs):
            if self.method is not None:
                forward, backward = self.tokens.setdefault(self.method, [0, 0])
                self.tokens[self.method] = [forward + idx.numel(), backward + idx.numel() * torch.is_grad_enabled()]
            return real(gpt, idx, *args, **kwargs)
        model.GPT.hidden_states = counted


def copied(out_dir, step):
    """A copy of out_dir's run as it is at `step`, to sample later."""
    target = f"{out_dir}@{step}"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(out_dir, target)
    return target


def train(main, flags, out_dir, steps):
    """Run a script to each of steps in turn (--resume continues it exactly), copying the run at each; a run
    the health check stops (diverged) keeps the copies it has. Returns (copies, diverged)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    copies = []
    for i, step in enumerate(steps):
        try:
            main(flags + ["--max_iters", str(step), "--out_dir", out_dir] + (["--resume"] if i else []))
        except SystemExit as stop:  # the health check stopped the run: it diverged (anything else is a mistake)
            if not any(word in str(stop.code) for word in ("diverged", " is nan", " is inf")):
                raise
            print(f"stopped: {stop.code}")
            return copies, True
        copies.append(copied(out_dir, step))
    return copies, False


METHODS = {  # name: (script main, flags before the swept ones, how a setting becomes flags)
    "DPO, offline pairs": (dpo.main, ["--demo", "--init", SFT, "--batch_size", "8", "--eval_interval", "0",
                                      "--eval_batches", "4", "--warmup", "5"], lambda b: ["--beta", str(b)]),
    "DPO, on-policy pairs": (dpo.main, ["--demo", "--init", SFT, "--data", f"{OUT}/onpolicy-pairs.jsonl",
                                        "--batch_size", "8", "--eval_interval", "0", "--eval_batches", "4",
                                        "--warmup", "5"], lambda b: ["--beta", str(b)]),
    "PPO": (rlhf.main, ["ppo", "--demo", "--init", SFT, "--reward", f"{OUT}/reward", "--batch_size", "16",
                        "--eval_interval", "0", "--eval_prompts", "16", "--warmup", "2"], lambda k: ["--kl_coef", str(k)]),
    "PPO-GT": (rlhf.main, ["ppo", "--demo", "--oracle", "--init", SFT, "--batch_size", "16", "--eval_interval", "0",
                           "--eval_prompts", "16", "--warmup", "2"], lambda k: ["--kl_coef", str(k)]),
    "Preferred-FT": (sft.main, ["--demo", "--init", SFT, "--target", "chosen", "--batch_size", "16", "--warmup", "5",
                                "--eval_interval", "0", "--eval_batches", "4", "--lr_decay_iters", str(STEPS[-1])],
                     None),
}


def settings(method):
    if method.startswith("DPO"):
        return BETAS
    return KL_COEFS if method.startswith("PPO") else (None,)


def evaluate(models, name):
    """sample.py on the held-out prompts for [(label, path)]: {label: (kl, kl_se, reward, reward_se, mean length)}."""
    sample.main(["--demo", "--model", f"sft={SFT}"] + [f"--model={label}={path}" for label, path in models] +
                ["--num_prompts", str(PROMPTS), "--results_dir", OUT, "--name", name, "--show", "0"])
    with open(f"{OUT}/{name}.json") as f:
        samples = json.load(f)["samples"]
    return {label: (*mean_and_sem([s["kl"] for s in rows]), *mean_and_sem([s["reward"] for s in rows]),
                    sum(s["tokens"] for s in rows) / len(rows)) for label, rows in samples.items()}


def best_of_n(counter):
    """For each N: the oracle's favourite of N samples of pi_SFT per held-out prompt (the same draws nested:
    best-of-2 picks among best-of-32's first two), and log N - (N - 1) / N, an upper bound on its KL."""
    tokenizer = get_tokenizer()
    policy = open_model(SFT).eval()
    texts = [p["prompt"] for p in load_preferences("toy", "test")[:PROMPTS]]
    prompts = [tokenizer.encode_ordinary(text) for text in texts]
    counter.method = "Best-of-N"
    rewards, lengths = [], []  # [draw][prompt]
    with torch.no_grad():
        for number in range(max(N_VALUES)):
            generators = [torch.Generator().manual_seed(7919 * number + i) for i in range(len(prompts))]
            new, replies = sample.complete(policy, prompts, tokenizer, generators, 40)
            rewards.append([toy_reward(text, reply) for text, reply in zip(texts, replies)])
            lengths.append([len(ids) for ids in new])
    counter.method = None
    points = {}
    for n in N_VALUES:
        # each prompt's first sample of the highest reward among its first n
        kept = [max(range(n), key=lambda d: (rewards[d][i], -d)) for i in range(len(prompts))]
        reward, error = mean_and_sem([rewards[d][i] for i, d in enumerate(kept)])
        length = sum(lengths[d][i] for i, d in enumerate(kept)) / len(kept)
        points[f"N={n}"] = (math.log(n) - (n - 1) / n, 0.0, reward, error, length)
    return points


def lesson_lines():
    """Lines of the code each method needs beyond SFT: DPO's loss and step, RLHF's reward model and PPO."""
    def lines(path, names):
        tree = ast.parse(open(path).read())
        return sum(node.end_lineno - node.lineno + 1 for node in tree.body
                   if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in names)
    return {"DPO": lines(dpo.__file__, {"dpo_loss", "pair_logps", "micro_batch"}),
            "RLHF": lines(rlhf.__file__, {"Scalar", "scalar_from", "full_rows", "scores_at_last", "reward_loss",
                                      "pair_scores", "train_reward", "kl_penalized_rewards", "gae", "ppo_loss",
                                      "value_loss", "rollouts", "score", "train_ppo"})}


def main():
    os.makedirs(OUT, exist_ok=True)
    started = time.time()
    counter = Counter()
    wall, runs = {}, {}  # runs: {method: {label: {"setting", "lr", "seed", "copies"}}}
    # the shared start: the demo's SFT, the reward model RLHF fits to the same pairs, on-policy pairs of pi_SFT
    counter.method = "SFT"
    t0 = time.time()
    shutil.rmtree(SFT, ignore_errors=True)
    sft.main(["--demo", "--out_dir", SFT, "--eval_batches", "4"])
    wall["SFT"] = time.time() - t0
    counter.method, t0 = "reward model", time.time()
    shutil.rmtree(f"{OUT}/reward", ignore_errors=True)
    rlhf.main(["reward", "--demo", "--init", SFT, "--lr", "3e-3", "--max_iters", str(STEPS[-1]), "--batch_size", "16",
               "--eval_interval", "20", "--eval_batches", "4", "--out_dir", f"{OUT}/reward"])
    wall["reward model"] = time.time() - t0
    counter.method, t0 = "on-policy pairs", time.time()
    onpolicy_pairs.main(["--init", SFT, "--out", f"{OUT}/onpolicy-pairs.jsonl", "--overwrite"])
    wall["on-policy pairs"] = time.time() - t0
    counter.method = None

    def run(method, setting, lr, seed):
        main_function, flags, setting_flags = METHODS[method]
        label = f"{method} | lr {lr:g}" + (f" | {setting:g}" if setting is not None else "") + f" | seed {seed}"
        slug = "".join(c if c.isalnum() else "-" for c in method.lower())
        out_dir = f"{OUT}/runs/{slug}-{len(runs.setdefault(method, {}))}"  # a folder per run: its copies are sampled later
        counter.method, t0 = method, time.time()
        argv = flags + (setting_flags(setting) if setting_flags else []) + ["--lr", str(lr), "--seed", str(seed)]
        copies, diverged = train(main_function, argv, out_dir, STEPS)
        wall[method] = wall.get(method, 0.0) + time.time() - t0
        counter.method = None
        runs[method][label] = {"setting": setting, "lr": lr, "seed": seed, "copies": copies, "diverged": diverged}
        return label

    points = {}

    def sample_runs(labels_by_method, name):
        todo = [(f"{label} @ {path.rsplit('@', 1)[1]}", path) for method, labels in labels_by_method.items()
                for label in labels for path in runs[method][label]["copies"]]
        points.update(evaluate(todo, name))

    # 1. the learning rate of each method, at its first setting
    phase = {m: [run(m, settings(m)[0], lr, SEEDS[0]) for lr in LRS] for m in METHODS}
    sample_runs(phase, "frontier-lr")
    def final_reward(label):  # a run that diverged before the end counts as the worst
        return points.get(f"{label} @ {STEPS[-1]}", (0, 0, -2.0))[2]
    final = {label: final_reward(label) for labels in phase.values() for label in labels}
    best_lr = {m: runs[m][max(labels, key=final.get)]["lr"] for m, labels in phase.items()}
    # 2. the other settings at that learning rate: the frontier
    phase = {m: [run(m, s, best_lr[m], SEEDS[0]) for s in settings(m)[1:]] for m in METHODS if settings(m)[0]}
    sample_runs(phase, "frontier-settings")
    final.update({label: final_reward(label) for labels in phase.values() for label in labels})
    # 3. the best setting of each method, with two more seeds: the spread
    best = {m: max((label for label in runs[m] if runs[m][label]["lr"] == best_lr[m]), key=final.get) for m in METHODS}
    phase = {m: [run(m, runs[m][best[m]]["setting"], best_lr[m], seed) for seed in SEEDS[1:]] for m in METHODS}
    sample_runs(phase, "frontier-seeds")
    points.update(best_of_n(counter))
    record = {"steps": STEPS, "lrs": LRS, "prompts": PROMPTS, "sft": points["sft"], "best_lr": best_lr,
              "best": best, "points": points, "runs": {m: {label: {k: v for k, v in r.items() if k != "copies"}
                                                            for label, r in labels.items()} for m, labels in runs.items()},
              "tokens": counter.tokens, "wall_s": wall, "total_s": time.time() - started, "lines": lesson_lines(),
              "machine": machine()}
    with open("results/frontier.json", "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote results/frontier.json after {record['total_s'] / 60:.1f} minutes")
    draw(record, "results/frontier.png")


def draw(record, out):
    """Left: oracle reward against KL from the SFT model, each run of each method a curve along its checkpoints
    (the best setting of a method drawn bold), best-of-N a dashed line at its KL bound; one standard error as
    bars. Right: the mean reply length of the same checkpoints against their KL."""
    points, runs, best = record["points"], record["runs"], record["best"]
    fig, (ax, lengths) = plt.subplots(1, 2, figsize=(plot.FIGSIZE[0] * 1.3, plot.FIGSIZE[1]),
                                      gridspec_kw={"width_ratios": [3, 2]})
    colors = dict(zip(list(runs) + ["Best-of-N"], plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    sft_kl, _, sft_reward, sft_error, sft_length = points["sft"]
    ax.errorbar([sft_kl], [sft_reward], yerr=[sft_error], fmt="ks", capsize=3, label="SFT (the reference)")
    lengths.plot([sft_kl], [sft_length], "ks")
    for method, labels in runs.items():
        for label in labels:
            path = sorted((int(key.rsplit("@", 1)[1]), value) for key, value in points.items()
                          if key.startswith(label + " @"))
            if not path:
                continue
            kl = [sft_kl] + [p[1][0] for p in path]
            bold = label == best[method]
            style = dict(color=colors[method], lw=2.2 if bold else 0.8, alpha=1 if bold else 0.45)
            ax.errorbar(kl, [sft_reward] + [p[1][2] for p in path], yerr=[sft_error] + [p[1][3] for p in path],
                        fmt="o-" if bold else ".-", capsize=2 if bold else 0, label=method if bold else None, **style)
            lengths.plot(kl, [sft_length] + [p[1][4] for p in path], "o-" if bold else ".-", **style)
    n_points = sorted((value for key, value in points.items() if key.startswith("N=")), key=lambda v: v[0])
    ax.errorbar([p[0] for p in n_points], [p[2] for p in n_points], yerr=[p[3] for p in n_points], fmt="^--",
                color=colors["Best-of-N"], capsize=2, label="Best-of-N (KL: its bound log N - (N-1)/N)")
    lengths.plot([p[0] for p in n_points], [p[4] for p in n_points], "^--", color=colors["Best-of-N"])
    for axis in (ax, lengths):
        axis.set_xscale("symlog", linthresh=0.1)
        axis.set_xlabel("KL(policy || SFT model) on its own samples (nats; linear below 0.1)")
        axis.grid(alpha=0.3)
    ax.set_ylabel(f"oracle reward (mean over {record['prompts']} held-out prompts)")
    lengths.set_ylabel("mean reply length (tokens)")
    ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("The DPO paper's fig. 2 on the toy task: reward against KL, each method's best setting bold",
                 fontsize=10)
    plot.save(fig, out)


if __name__ == "__main__":
    main()
