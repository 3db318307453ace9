"""Every table and number of README.md and docs/*.md, made from results/*.json (a few from the settings in
the code they describe, such as the demo's steps and lr, or the memory formulas of benchmarks/memory.py), so
that a rerun changes them and nothing else. In the Markdown a table stands between `<!-- table NAME -->` and `<!-- /table -->`, and a
number between `<!-- number NAME -->` and `<!-- /number -->` (invisible once rendered). Only tables and numbers
are made here; the sentences around them are written by hand, and tests/test_claims.py fails when the results
stop supporting one.

    python -m experiments.tables --write    # rewrite them all from results/
    python -m experiments.tables --check    # exit 1, naming each one that differs (tests/test_tables.py runs it)
"""
import glob
import json
import math
import os
import re
import sys
from collections import defaultdict

import data
import dpo
import sft
from benchmarks.memory import CARDS_GIB, memory_table as rows_of
from experiments.exercises import EXERCISES, diff
from machinery.files import write_text
from machinery.results import COLUMNS, cell, mean_and_sem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = re.compile(r"(<!-- (table|number) ([\w.:/-]+) -->)(.*?)(<!-- /\2 -->)", re.S)


def load(name):
    with open(os.path.join(ROOT, "results", name)) as f:
        return json.load(f)


def pm(mean, error, digits=2):
    """mean ± error, the error left out where there is none (a single value)."""
    if error is None or not math.isfinite(error):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {error:.{digits}f}"


def spread(values, digits=2):
    """Across seeds: mean ± its standard error, and the range."""
    return f"{pm(*mean_and_sem(values), digits)} ({min(values):.{digits}f} to {max(values):.{digits}f})"


def markdown(header, rows, align=None):
    align = align or ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


# ----------------------------------------------------------------------------------------------------
# Section 1's worked pair: results/worked-example.json (python -m experiments.demo)

def worked_table():
    w = load("worked-example.json")
    rows = [["log π(y_w|x), the chosen reply", f"{w['ref_chosen']:.3f}", f"{w['chosen']:.3f}"],
            ["log π(y_l|x), the rejected reply", f"{w['ref_rejected']:.3f}", f"{w['rejected']:.3f}"],
            ["h = [log π(y_w) − log π_ref(y_w)] − [log π(y_l) − log π_ref(y_l)]", "0", f"{w['h']:.3f}"],
            [f"β h (β = {w['beta']:g})", "0", f"{w['beta_h']:.4f}"],
            ["loss −log σ(β h)", f"ln 2 = {math.log(2):.4f}", f"{w['loss']:.4f}"],
            ["pull σ(−β h)", "0.5", f"{w['pull']:.4f}"]]
    return markdown(["", "step 0: π = π_ref (the SFT model)", "after the demo's DPO (π)"], rows,
                    ["---", "---:", "---:"])


# ----------------------------------------------------------------------------------------------------
# The demo: results/demo.json and demo-seeds.json (python -m experiments.demo, experiments.demo_seeds)

def demo_table():
    """The committed run, in sample.py's own layout."""
    record = load("demo.json")
    names = {"sft": "sft (the reference)", "dpo": "dpo", "dpo-bad": "dpo-bad (--swap)"}
    rows = [[names.get(label, label)] + [cell(row, key, decimals) if key != "kl" or label != "sft" else "0"
                                         for key, _, decimals in COLUMNS] for label, row in record["summary"].items()]
    return markdown(["model"] + [title for _, title, _ in COLUMNS], rows)


def demo_runs():
    """The runs of demo-seeds.json at the demo's own settings (sft.py --demo, dpo.py --demo)."""
    record = load("demo-seeds.json")
    setting = f"lr {dpo.DEMO['lr']:.0e}".replace("e-0", "e-") + f", {dpo.DEMO['max_iters']} steps"
    runs = [r for r in record["runs"] if r["sft_steps"] == sft.DEMO["max_iters"] and r["dpo"] == setting]
    assert len(runs) == len(record["seeds"]), f"demo-seeds.json has no runs at the demo's settings ({setting})"
    return runs


def demo_seeds_table():
    runs = demo_runs()
    rows = []
    for name, key in (("sft (the reference)", "sft"), ("dpo", "dpo_model"), ("dpo-bad (--swap)", "bad")):
        rows.append([name, spread([r[key]["oracle_reward"] for r in runs]),
                     spread([r[key]["kl"] for r in runs]) if key != "sft" else "0",
                     pm(*mean_and_sem([r[key]["mean_length"] for r in runs]), 1)])
    return markdown(["model", "oracle reward", "KL from the reference (nats)", "mean length (tokens)"], rows)


def demo_candidates_table():
    record = load("demo-seeds.json")
    groups = defaultdict(list)
    for r in record["runs"]:
        groups[(r["sft_steps"], r["dpo"])].append(r)
    rows, demo = [], demo_runs()
    for (steps, setting), runs in groups.items():
        gains, kls = [r["gain"] for r in runs], [r["dpo_model"]["kl"] for r in runs]
        chosen = steps == sft.DEMO["max_iters"] and runs == demo
        name = f"**{steps}, {setting} (the demo)**" if chosen else f"{steps}, {setting}"
        answered = [r["dpo_model"].get("answered", math.nan) for r in runs]
        rows.append([name, spread(gains), f"{sum(g > 0 for g in gains)} of {len(gains)}", f"{max(kls):.2f}",
                     pm(*mean_and_sem([r["dpo_model"]["mean_length"] for r in runs]), 1),
                     f"{sum(answered) / len(answered):.0%}"])
    return markdown(["SFT steps, DPO setting", "DPO's gain in oracle reward", "seeds it gained in",
                     "largest KL (nats)", "DPO's mean length", "DPO answered"], rows)


def demo_answered(steps, model):
    """The share of replies that answer, over the seeds and every DPO setting from SFT of `steps` steps."""
    record = load("demo-seeds.json")
    key = {"sft": "sft", "dpo": "dpo_model"}[model]
    values = [r[key]["answered"] for r in record["runs"] if r["sft_steps"] == int(steps)]
    return f"{sum(values) / len(values):.0%}"


def demo_gain():
    samples = load("demo.json")["samples"]
    return pm(*mean_and_sem([b["reward"] - a["reward"] for a, b in zip(samples["sft"], samples["dpo"])]))


def demo_seeds_gain():
    return spread([r["gain"] for r in demo_runs()])


def demo_prompt_sets():
    """The same SFT recipe (the seeds demo_seeds and sft_length share, at the demo's SFT steps) on the demo's
    prompts and on all 200: the two means, over those seeds."""
    on_200 = {r["seed"]: r["sft_reward"] for r in load("sft-length.json")["runs"]
              if r["sft_steps"] == sft.DEMO["max_iters"]}
    on_64 = [r["sft"]["oracle_reward"] for r in demo_runs() if r["seed"] in on_200]
    return f"{sum(on_64) / len(on_64):.2f} on the first 64 and {sum(on_200.values()) / len(on_200):.2f} on all 200"


def demo_threads(key):
    """The committed DPO row again, from the same demo run with one thread: its reward or its KL."""
    row = load("demo-threads.json")["summary"]["dpo"]
    return pm(row["oracle_reward"], row["oracle_reward_se"]) if key == "reward" else f"{row['kl']:.2f}"


def demo_seconds():
    return f"{sum(load('demo-time.json')['seconds'].values()):.0f}"


def demo_knob(key):
    knob = load("demo-knob.json")["summary"]["dpo-beta5.0"]
    return {"reward": pm(knob["oracle_reward"], knob["oracle_reward_se"]), "kl": f"{knob['kl']:.2f}"}[key]


def demo_pairs_seen():
    steps, batch = dpo.DEMO["max_iters"], dpo.DEMO["batch_size"] * dpo.DEMO["grad_accum"]
    return f"{steps * batch:,} of the {len(data.toy_pairs('train')):,}"


def suite_summary():
    if not os.path.isfile(os.path.join(ROOT, "results", "suite.json")):  # the suite must pass once to be timed
        return "(not measured yet: `python -m experiments.suite` times it)"
    suite = load("suite.json")
    counts = ", ".join(f"{n} {word}" for word, n in suite["counts"].items())
    where = suite["machine"] if isinstance(suite.get("machine"), dict) else suite  # older files: at the top
    return f"{counts} in {suite['seconds']:.0f} s on {where['cpus']} CPU cores ({where['date']})"


# ----------------------------------------------------------------------------------------------------
# SFT length: results/sft-length.json (python -m experiments.sft_length)

SFT_KEYS = ("sft_test_loss", "sft_reward", "dpo_reward", "gain", "kl", "dpo_margin", "sft_length", "dpo_length")


def sft_length_rows():
    """{steps: {key: (mean over seeds, its standard error)}}, lengths in order."""
    record = load("sft-length.json")
    rows = {}
    for steps in record["lengths"]:
        runs = [r for r in record["runs"] if r["sft_steps"] == steps]
        rows[steps] = {key: mean_and_sem([r[key] for r in runs]) for key in SFT_KEYS}
        rows[steps]["seeds"] = len(runs)
    return rows


def sft_length_table():
    rows = [[steps, r["seeds"], pm(*r["sft_test_loss"], 3), pm(*r["sft_reward"]), pm(*r["dpo_reward"]),
             f"**{pm(*r['gain'])}**", pm(*r["kl"]), pm(*r["sft_length"], 1), pm(*r["dpo_length"], 1)]
            for steps, r in sft_length_rows().items()]
    return markdown(["SFT steps", "seeds", "SFT held-out loss", "SFT reward", "DPO reward", "gain (DPO − SFT)",
                     "DPO's KL (nats)", "SFT length", "DPO length"], rows)


def sft_length_number(steps, key, digits=2):
    mean, error = sft_length_rows()[int(steps)][key]
    return f"{mean:.{int(digits)}f}" if key in ("kl", "sft_test_loss", "sft_reward") else pm(mean, error, int(digits))


def sft_floor():
    floor = load("sft-length.json")["floor"]
    return f"ln {floor['choices']} / {floor['tokens']:.1f} = {floor['nats']:.3f}"


# ----------------------------------------------------------------------------------------------------
# Beta: results/beta-frontier.json (python -m experiments.beta_frontier)

def beta_cell(record, label):
    """Across the seeds: reward mean ± SE, KL mean, length mean."""
    points = record["points"][label]
    return (mean_and_sem([p["reward"] for p in points]), mean_and_sem([p["kl"] for p in points]),
            mean_and_sem([p["length"] for p in points]))


def family_name(family):
    return family.replace("beta", "β ").replace("-lr", ", lr ")


def beta_table():
    record = load("beta-frontier.json")
    rows = []
    for family in record["families"]:
        cells = []
        for step in record["steps"]:
            reward, kl, length = beta_cell(record, f"{family}@{step}")
            cells.append(f"{pm(*reward)} ({kl[0]:.2f}; {length[0]:.1f})")
        rows.append([family_name(family), *cells])
    reward, _, length = beta_cell(record, "sft")
    return markdown(["run"] + [f"step {step}" for step in record["steps"]], rows) + \
        f"\n\nEach cell: oracle reward, the mean over {len(record['seeds'])} seeds ± its standard error across them " \
        f"(then the mean KL in nats; the mean reply length in tokens), {record['prompts']} held-out prompts each. " \
        f"The SFT models themselves: {pm(*reward)} ({length[0]:.1f} tokens)."


def beta_number(family, step, key):
    record = load("beta-frontier.json")
    reward, kl, length = beta_cell(record, "sft" if family == "sft" else f"{family}@{step}")
    return {"reward": pm(*reward), "kl": f"{kl[0]:.2f}", "length": f"{length[0]:.1f}"}[key]


def curve_values(family, key, step, split="test"):
    """A metric of each seed's run of a family at a step: [value per seed]."""
    record = load("beta-frontier.json")
    return [next(r[key] for r in records if r["iter"] == step and r["split"] == split)
            for records in record["curves"][family].values()]


def curve_number(family, key, step, split="test", digits=2):
    return pm(*mean_and_sem(curve_values(family, key, int(step), split)), int(digits))


def pull_number(family, step):
    """σ(−β h) at the held-out pairs' mean margin β h (rewards/margin), over the seeds."""
    return pm(*mean_and_sem([1 / (1 + math.exp(m)) for m in curve_values(family, "rewards/margin", int(step))]))


# ----------------------------------------------------------------------------------------------------
# The exercises: results/exercises.json (python -m experiments.exercises)

def exercise_diffs():
    """Every exercise's edit, numbered, in one diff block."""
    return "```diff\n" + "\n".join(f"{i}. {diff(name)}" for i, name in enumerate(EXERCISES, 1)) + "\n```"


def exercise_number(key, spec=".3g"):
    """A number of exercises.json: key a path of fields joined by "/", spec its format (".3g", ".7f")."""
    value = load("exercises.json")
    for part in key.split("/"):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return format(value, spec)


def accumulation_error(data_name):
    """Exercise 5: how far each micro-batch's own mean moves the first step's gradient norm, in percent."""
    norms = load("exercises.json")["per-micro-batch-mean"]
    right, wrong = norms[f"{data_name}: one batch"], norms[f"{data_name}: 4 micro-batches (broken)"]
    return f"{abs(wrong - right) / right:.2%}"


def margin_ratio():
    """Exercise 1: the summed margin over the averaged one."""
    runs = load("exercises.json")["mean"]
    return f"{runs['sum']['margin'] / runs['mean']['margin']:.0f}"


# ----------------------------------------------------------------------------------------------------
# docs: the memory table and performance (benchmarks/)

def memory_table():
    by_model = {}
    for row in rows_of():
        by_model.setdefault(row["model"], {})[row["mode"]] = row
    chunked = {row["model"]: row for row in rows_of(chunked_head=True) if row["mode"] == "reference live"}
    sizes = {"gpt2": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1.56B"}
    rows = []
    for name, modes in by_model.items():
        live = modes["reference live"]
        fits = ", ".join(f"{card} GB" for card in CARDS_GIB if card in live["fits"]) or "none"
        checkpointed = modes["--grad_checkpoint"]
        rows.append([f"{name} ({sizes[name]})", f"{live['peak_gib']:.1f} GiB", f"{modes['--precompute_ref']['peak_gib']:.1f} GiB",
                     f"{checkpointed['peak_gib']:.1f} GiB", f"{chunked[name]['peak_gib']:.1f} GiB", fits,
                     ", ".join(f"{card} GB" for card in CARDS_GIB if card in checkpointed["fits"]) or "none"])
    return markdown(["model", "reference live", "`--precompute_ref`", "`--grad_checkpoint`", "`--chunked_head`",
                     "fits (reference live)", "fits with `--grad_checkpoint`"], rows,
                    ["---", "---:", "---:", "---:", "---:", "---", "---"])


def performance_trl():
    trl = load("performance.json")["trl"]
    rows = [[name, f"{seconds:.3f}", f"{mib:,}"] for name, seconds, mib in trl["rows"]]
    _, theirs, their_mib = trl["rows"][-1]
    for name, seconds, mib in trl["rows"][:-1]:
        rows.append([f"{name.split(' ', 1)[1]} / TRL", f"**{seconds / theirs:.3f}**", f"**{mib / their_mib:.3f}**"])
    return (markdown(["", "seconds per DPO step", "peak RSS (MiB)"], rows) +
            f"\n\n`{trl['command']}`, {trl['date']}; {trl['versions']}; {trl['load']}.")


def performance_heads():
    """The plain head against --chunked_head: time and peak memory on the TRL workload, and GPT-2's computed peak."""
    trl = {name: (seconds, mib) for name, seconds, mib in load("performance.json")["trl"]["rows"]}
    plain, chunked = trl["nanoDPO `dpo.py --optimizer adamw`"], trl["nanoDPO `dpo.py --optimizer adamw --chunked_head`"]
    peaks = {head: {row["model"]: row["peak_gib"] for row in rows_of(chunked_head=head) if row["mode"] == "reference live"}
             for head in (False, True)}
    rows = [[name, f"{seconds:.3f} s", f"{mib:,} MiB"] + [f"{peaks[head][model]:.1f} GiB" for model in ("gpt2", "gpt2-medium")]
            for name, (seconds, mib), head in (("plain (the default)", plain, False), ("`--chunked_head`", chunked, True))]
    return markdown(["output layer", "TRL workload: seconds per step", "its peak RSS", "gpt2, 8 × 512: computed peak",
                     "gpt2-medium"], rows)


def performance_bench():
    bench = load("performance.json")["bench"]
    rows = [[step, f"{ms:,}", f"{tokens:,}", f"{tflops:.2f}", f"{mfu:.1%}", f"{mb:,} MB"]
            for step, ms, tokens, tflops, mfu, mb in bench["rows"]]
    return markdown(["step", "ms", "tokens/s", "TFLOP/s", "MFU", "peak RSS"], rows) + \
        f"\n\nThe measured peak of a 2048 × 2048 fp32 matmul: {bench['peak_tflops']:.2f} TFLOP/s."


def performance_memory_check():
    rows = [[*labels, f"{measured:.1f}", f"{computed:.1f}", f"{measured / computed:.3f}"]
            for *labels, measured, computed in load("performance.json")["memory_check"]["rows"]]
    return markdown(["precision", "`--grad_checkpoint`", "fused AdamW", "reference", "head", "measured MiB",
                     "computed MiB", "ratio"], rows, ["---", "---", "---", "---", "---", "---:", "---:", "---:"])


def performance_torchrun():
    rows = [[name, f"{tokens:,}", f"{seconds:.2f}", f"{whole:.1f} s"] for name, tokens, seconds, whole
            in load("performance.json")["torchrun"]["rows"]]
    return markdown(["", "tokens/s (steps 4 to 12)", "seconds per step", "whole run"], rows)


# ----------------------------------------------------------------------------------------------------
# What DPO replaced: results/frontier.json (python -m experiments.frontier)

METHOD_ORDER = ("DPO, offline pairs", "DPO, on-policy pairs", "PPO", "PPO-GT", "Preferred-FT", "Best-of-N")
BUDGETS = (1, 3, 10)


def frontier_points(record, method):
    """(kl, kl_se, reward, reward_se, length) of every point of a method: its runs' checkpoints, or best-of-N's N."""
    if method == "Best-of-N":
        return [tuple(v[:5]) for k, v in record["points"].items() if k.startswith("N=")]
    return [tuple(v[:5]) for k, v in record["points"].items() if k.split(" @ ")[0] in record["runs"][method]]


def best_within(record, method, limit):
    """The point of a method with the highest reward at KL <= limit, or None."""
    within = [p for p in frontier_points(record, method) if p[0] <= limit]
    return max(within, key=lambda p: p[2]) if within else None


def run_path(record, label):
    """[(step, kl, reward, reward_se, length)] of one run, in step order."""
    return sorted((int(k.rsplit(" @ ", 1)[1]), v[0], v[2], v[3], v[4]) for k, v in record["points"].items()
                  if k.startswith(label + " @ "))


def collapsed(path):
    """Reward falling back while KL runs away: the final reward two standard errors below the run's best
    checkpoint, at a higher KL."""
    best = max(path, key=lambda p: p[2])
    final = path[-1]
    return final[2] < best[2] - 2 * final[3] and final[1] > best[1]


def best_setting_runs(record, method):
    """The labels of a method's runs at its best setting (its three seeds)."""
    runs = record["runs"][method]
    best = runs[record["best"][method]]
    return [label for label, run in runs.items() if run["lr"] == best["lr"] and run["setting"] == best["setting"]]


def seed_bests(record, method, limit):
    """At a method's best setting, each seed's best checkpoint within KL <= limit: [(step, kl, reward, se,
    length) or None]."""
    bests = []
    for label in best_setting_runs(record, method):
        within = [p for p in run_path(record, label) if p[1] <= limit]
        bests.append(max(within, key=lambda p: p[2]) if within else None)
    return bests


def frontier_best():
    """Per method and KL budget: its seeds' best checkpoints at its best setting, mean ± standard error across
    the seeds and their range (best-of-N, which trains nothing, has one value: ± over the prompts)."""
    record = load("frontier.json")
    rows = []
    for method in METHOD_ORDER:
        cells = []
        for limit in BUDGETS:
            if method == "Best-of-N":
                best = best_within(record, method, limit)
                cells.append(f"{pm(best[2], best[3])} (KL {best[0]:.1f}; {best[4]:.1f})")
                continue
            found = [p for p in seed_bests(record, method, limit) if p is not None]
            seeds = len(best_setting_runs(record, method))
            cells.append("none" if not found else f"{spread([p[2] for p in found])} (KL "
                         f"{sum(p[1] for p in found) / len(found):.1f}; {sum(p[4] for p in found) / len(found):.1f})"
                         + (f", {len(found)} of {seeds} seeds" if len(found) < seeds else ""))
        rows.append([method] + cells)
    sft = record["points"]["sft"]
    return markdown(["method"] + [f"KL ≤ {limit} nat{'s' if limit > 1 else ''}" for limit in BUDGETS], rows) + \
        f"\n\nEach cell: oracle reward, mean ± standard error across the seeds (their range) (mean KL in nats; mean " \
        f"reply length in tokens), on {record['prompts']} held-out prompts. The SFT model itself: " \
        f"{pm(sft[2], sft[3])} ({sft[4]:.1f} tokens)."


def run_cost(record, method):
    """A method's forward tokens, backward tokens and wall-clock seconds per run, its own first stage (PPO's
    reward model, on-policy DPO's pairs) shared out over its runs."""
    parts = [method] + {"PPO": ["reward model"], "DPO, on-policy pairs": ["on-policy pairs"]}.get(method, [])
    tokens, wall, n = record["tokens"], record["wall_s"], len(record["runs"][method])
    return (sum(tokens.get(p, [0, 0])[0] for p in parts) / n, sum(tokens.get(p, [0, 0])[1] for p in parts) / n,
            sum(wall.get(p, 0.0) for p in parts) / n)


def frontier_cost():
    """Per method: its best setting; the final reward and length over the seeds; runs diverged or collapsed;
    tokens through the model and wall-clock per run (its own first stage included)."""
    record = load("frontier.json")
    rows = []
    for method in METHOD_ORDER[:-1]:
        runs = record["runs"][method]
        best = runs[record["best"][method]]
        finals = [run_path(record, label)[-1] for label in best_setting_runs(record, method) if run_path(record, label)]
        setting = f"lr {best['lr']:g}" + (f", {'β' if method.startswith('DPO') else 'KL coef'} {best['setting']:g}"
                                         if best["setting"] is not None else "")
        diverged = sum(run["diverged"] for run in runs.values())
        fell = sum(collapsed(path) for path in map(lambda label: run_path(record, label), runs) if len(path) > 1)
        forward, backward, seconds = run_cost(record, method)
        rows.append([method, setting, f"{spread([f[2] for f in finals])} ({len(finals)})",
                     pm(*mean_and_sem([f[4] for f in finals]), 1), f"{diverged}, {fell} of {len(runs)}",
                     f"{forward / 1e6:.2f}M / {backward / 1e6:.2f}M", f"{seconds:.0f} s"])
    return markdown(["method", "best setting", "final reward (range) (seeds)", "final length", "runs diverged, collapsed",
                     "tokens a run: forward / backward", "wall-clock a run"], rows,
                    ["---", "---", "---:", "---:", "---:", "---:", "---:"])


def frontier_number(method, limit, key):
    point = best_within(load("frontier.json"), method, float(limit))
    return {"reward": pm(point[2], point[3]), "kl": f"{point[0]:.1f}", "length": f"{point[4]:.1f}"}[key]


def frontier_seeds(method, limit):
    record = load("frontier.json")
    return spread([p[2] for p in seed_bests(record, METHODS[method], float(limit)) if p is not None])


def frontier_final(method, key):
    record = load("frontier.json")
    finals = [run_path(record, label)[-1] for label in best_setting_runs(record, method)]
    return spread([f[{"reward": 2, "length": 4, "kl": 1}[key]] for f in finals], 1 if key == "length" else 2)


def frontier_ratio(kind):
    """A PPO run (with its share of the reward model) against an offline DPO run: tokens or wall-clock."""
    record = load("frontier.json")
    ppo, dpo_offline = run_cost(record, "PPO"), run_cost(record, "DPO, offline pairs")
    which = 0 if kind == "tokens" else 2  # forward tokens, or seconds
    return f"{ppo[which] / dpo_offline[which]:.1f}"


TABLES = {"worked": worked_table, "demo": demo_table, "demo-seeds": demo_seeds_table,
          "demo-candidates": demo_candidates_table, "sft-length": sft_length_table, "beta": beta_table,
          "exercises": exercise_diffs, "memory": memory_table, "performance.trl": performance_trl,
          "performance.heads": performance_heads, "performance.bench": performance_bench, "performance.memory-check": performance_memory_check,
          "performance.torchrun": performance_torchrun, "frontier.best": frontier_best, "frontier.cost": frontier_cost}
NUMBERS = {"demo.gain": demo_gain, "demo.seeds-gain": demo_seeds_gain, "demo.prompt-sets": demo_prompt_sets, "demo.seconds": demo_seconds,
           "demo.pairs-seen": demo_pairs_seen, "demo.sft-steps": lambda: str(sft.DEMO["max_iters"]),
           "demo.lr": lambda: f"{dpo.DEMO['lr']:g}", "demo.seeds": lambda: str(len(load("demo-seeds.json")["seeds"])),
           "suite.summary": suite_summary, "sft-length.floor": sft_floor,
           "frontier.minutes": lambda: f"{load('frontier.json')['total_s'] / 60:.0f}",
           "frontier.tokens-ratio": lambda: frontier_ratio("tokens"),
           "frontier.wall-ratio": lambda: frontier_ratio("wall"),
           "frontier.lines-dpo": lambda: str(load("frontier.json")["lines"]["DPO"]),
           "frontier.lines-rlhf": lambda: str(load("frontier.json")["lines"]["RLHF"]), "exercise.margin-ratio": margin_ratio}


def worked_number(key):
    w = load("worked-example.json")
    values = {"rise": w["chosen"] - w["ref_chosen"], "fall": w["rejected"] - w["ref_rejected"], "h": w["h"],
              "beta-h": w["beta_h"], "loss": w["loss"], "pull": w["pull"], "steps": dpo.DEMO["max_iters"]}
    return f"{values[key]:+.3f}" if key in ("rise", "fall") else f"{values[key]:.3g}"


def allocator_number(mode, key):
    """benchmarks/allocator.py's median step time (ms) or peak resident memory (peak_mb), mode default or kept."""
    return f"{load('performance.json')['allocator'][mode][key]:.0f}"


METHODS = {"dpo-offline": "DPO, offline pairs", "dpo-onpolicy": "DPO, on-policy pairs", "ppo": "PPO", "ppo-gt": "PPO-GT",
           "preferred-ft": "Preferred-FT", "best-of-n": "Best-of-N"}


def number(name):
    """A number named NAME, or one of the families, their parts joined by ':': worked:KEY, demo-knob:KEY,
    demo-threads:KEY, demo-answered:STEPS:MODEL,
    sft-length:STEPS:KEY, beta:FAMILY:STEP:KEY, curve:FAMILY:KEY:STEP[:SPLIT:DIGITS], pull:FAMILY:STEP,
    exercise:KEY[:SPEC] (KEY a path of fields joined by '/'), allocator:MODE:KEY, accumulation:DATA, frontier:METHOD:LIMIT:KEY,
    frontier-final:METHOD:KEY, frontier-seeds:METHOD:LIMIT (METHOD a key of METHODS)."""
    if name in NUMBERS:
        return NUMBERS[name]()
    kind, *parts = name.split(":")
    makers = {"worked": worked_number, "demo-knob": demo_knob, "demo-threads": demo_threads, "demo-answered": demo_answered, "sft-length": sft_length_number, "beta": beta_number, "pull": pull_number,
              "curve": curve_number, "exercise": exercise_number, "allocator": allocator_number, "accumulation": accumulation_error,
              "frontier": lambda method, limit, key: frontier_number(METHODS[method], limit, key),
              "frontier-final": lambda method, key: frontier_final(METHODS[method], key), "frontier-seeds": frontier_seeds}
    if kind not in makers:
        raise KeyError(name)
    return makers[kind](*parts)


# ----------------------------------------------------------------------------------------------------
# Rewriting and checking the Markdown

def documents():
    return [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def render(text, path="text"):
    """text with every table and number made afresh; raises KeyError naming an unknown one."""
    def replace(match):
        opening, kind, name, _, closing = match.groups()
        try:
            made = TABLES[name]() if kind == "table" else number(name)
        except KeyError:
            raise KeyError(f"{path}: no {kind} named {name!r} in experiments/tables.py") from None
        return f"{opening}\n{made}\n{closing}" if kind == "table" else f"{opening}{made}{closing}"
    return BLOCK.sub(replace, text)


def differences(text, path="text"):
    """The names of the tables and numbers in text that differ from what results/ gives."""
    made = BLOCK.finditer(render(text, path))  # the same blocks in the same order (a name may be a table and a number)
    return [m.group(3) for m, fresh in zip(BLOCK.finditer(text), made) if fresh.group(4) != m.group(4)]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv not in (["--write"], ["--check"]):
        sys.exit("usage: python -m experiments.tables --write | --check")
    texts = {}
    for path in documents():
        with open(path, encoding="utf-8") as f:
            texts[path] = f.read()
    if argv == ["--write"]:
        # every document is made in memory before any is written, and each is written whole
        # (a temporary file renamed over it): a table that cannot be made leaves all of them as they were
        try:
            made = {path: render(text, path) for path, text in texts.items()}
        except FileNotFoundError as error:
            sys.exit(f"{os.path.relpath(error.filename, ROOT)} is missing: results/README.md names the module "
                     "that makes it; nothing was written")
        for path, text in made.items():
            if text != texts[path]:
                write_text(path, text)
    stale = [f"{os.path.relpath(path, ROOT)}: {name}" for path, text in texts.items()
             for name in (differences(text, path) if argv == ["--check"] else [])]
    if stale:
        sys.exit("these differ from what results/ gives (run python -m experiments.tables --write): " + ", ".join(stale))


if __name__ == "__main__":
    main()
