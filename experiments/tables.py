"""Every table and number of README.md and docs/*.md that a run measured, made from results/*.json: true by
construction. In the Markdown a table stands between `<!-- table NAME -->` and `<!-- /table -->`, and a
number in a sentence between `<!-- number NAME -->` and `<!-- /number -->` (invisible once rendered).

    python -m experiments.tables --write    # rewrite them all from results/
    python -m experiments.tables --check    # exit 1, naming each one that differs (tests/test_tables.py runs it)
"""
import glob
import json
import math
import os
import re
import sys

import data
import dpo
import sft
from benchmarks.memory import CARDS_GIB, memory_table as rows_of
from experiments.exercises import diff
from machinery.results import mean_and_sem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = re.compile(r"(<!-- (table|number) ([\w.-]+) -->)(.*?)(<!-- /\2 -->)", re.S)


def load(name):
    with open(os.path.join(ROOT, "results", name)) as f:
        return json.load(f)


def pm(mean, error, digits=3):
    """mean ± error, the error left out where there is none (a single value)."""
    if error is None or not math.isfinite(error):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {error:.{digits}f}"


def markdown(header, rows, align=None):
    align = align or ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


# ----------------------------------------------------------------------------------------------------
# The demo: results/demo.json (python -m experiments.demo)

def demo_table():
    record = load("demo.json")
    names = {"sft": "sft (the reference)", "dpo": "dpo", "dpo-bad": "dpo-bad (--swap)"}
    rows = []
    for label, summary in record["summary"].items():
        rows.append([names.get(label, label), pm(summary["oracle_reward"], summary["oracle_reward_se"]),
                     pm(summary["kl"], summary["kl_se"], 2) if label != "sft" else "0",
                     f"{summary['mean_length']:.1f}", f"{summary['accuracy']:.3f}"])
    return markdown(["model", "oracle reward", "KL from the reference (nats)", "mean length (tokens)",
                     "held-out accuracy"], rows)


def demo_gain():
    samples = load("demo.json")["samples"]
    return pm(*mean_and_sem([b["reward"] - a["reward"] for a, b in zip(samples["sft"], samples["dpo"])]))


def demo_seconds(stage=None):
    timing = load("demo-time.json")
    return f"{timing['seconds'][stage] if stage else sum(timing['seconds'].values()):.0f}"



def demo_pairs_seen():
    pairs = len(data.toy_pairs("train"))
    steps, batch = dpo.DEMO["max_iters"], dpo.DEMO["batch_size"] * dpo.DEMO["grad_accum"]
    assert steps * batch < pairs, "the demo's DPO now sees every pair: rewrite the --precompute_ref sentence"
    return f"whose {steps} steps of {batch} pairs see {steps * batch:,} of the {pairs:,} training pairs"


def suite_summary():
    if not os.path.isfile(os.path.join(ROOT, "results", "suite.json")):  # the suite must pass once to be timed
        return "(not measured yet: `python -m experiments.suite` times it)"
    suite = load("suite.json")
    counts = ", ".join(f"{n} {word}" for word, n in suite["counts"].items())
    return (f"Its last full run here: {counts} in {suite['seconds']:.0f} s on {suite['cpus']} CPU cores "
            f"({suite['date']}, `python -m experiments.suite`).")


def demo_bad_accuracy():
    accuracy = load("demo.json")["summary"]["dpo-bad"]["accuracy"]
    assert accuracy < 0.5
    return f"{accuracy:.3f} (0.5 is chance)"


def demo_beta5():
    knob = load("demo-knob.json")
    summary = knob["summary"]
    dpo, beta5 = summary["dpo"], summary["dpo-beta5.0"]
    return (f"Here `{knob['command']}` gave an oracle reward of {pm(beta5['oracle_reward'], beta5['oracle_reward_se'], 2)} "
            f"at a KL of {beta5['kl']:.2f} nats, against {pm(dpo['oracle_reward'], dpo['oracle_reward_se'], 2)} at "
            f"{dpo['kl']:.2f} for β 0.1: a large β holds the policy close to the reference.")


# ----------------------------------------------------------------------------------------------------
# SFT length: results/sft-length.json (python -m experiments.sft_length)

def sft_length_rows():
    """{steps: {key: (mean over seeds, its standard error)}}, lengths in order."""
    record = load("sft-length.json")
    rows = {}
    for steps in record["lengths"]:
        runs = [r for r in record["runs"] if r["sft_steps"] == steps]
        rows[steps] = {key: mean_and_sem([r[key] for r in runs]) for key in
                       ("sft_test_loss", "sft_reward", "dpo_reward", "gain", "kl", "dpo_margin")}
        rows[steps]["seeds"] = len(runs)
    return rows


def demo_sft_steps():
    steps, rows = sft.DEMO["max_iters"], sft_length_rows()
    assert rows[steps]["sft_test_loss"][0] > 1.05 * load("sft-length.json")["floor"]["nats"], "the demo reaches the floor"
    return str(steps)


def sft_length_table():
    rows = [[steps, r["seeds"], pm(*r["sft_test_loss"]), pm(*r["sft_reward"], 2), pm(*r["dpo_reward"], 2),
             f"**{pm(*r['gain'], 2)}**", pm(*r["kl"], 2), pm(*r["dpo_margin"], 2)]
            for steps, r in sft_length_rows().items()]
    return markdown(["SFT steps", "seeds", "SFT held-out loss", "SFT reward", "DPO reward", "gain (DPO − SFT)",
                     "DPO's KL (nats)", "DPO's held-out margin β h"], rows) + \
        "\n\nEach cell: the mean over the seeds ± its standard error (seed to seed)."


def sft_length_finding():
    record, rows = load("sft-length.json"), sft_length_rows()
    best = max(rows, key=lambda steps: rows[steps]["gain"][0])
    longest, shortest = max(rows), min(rows)
    floor = record["floor"]
    # the sentence's words, checked against the numbers: a rerun that changes them fails here, not silently
    assert shortest < best < longest, "the best SFT length is no longer in the middle: rewrite the finding"
    assert rows[best]["sft_test_loss"][0] < 1.05 * floor["nats"], "the best length is not at the floor: rewrite"
    assert rows[longest]["gain"][0] + rows[longest]["gain"][1] < rows[best]["gain"][0] - rows[best]["gain"][1]
    assert rows[longest]["kl"][0] < rows[best]["kl"][0] and rows[shortest]["gain"][0] < rows[best]["gain"][0]
    return (f"DPO gained most after {best} SFT steps ({pm(*rows[best]['gain'], 2)}), where SFT's held-out loss "
            f"reached the data's floor ({rows[best]['sft_test_loss'][0]:.3f}, against ln {floor['choices']} / "
            f"{floor['tokens']:.1f} = {floor['nats']:.3f} nats a token: a toy reply is one of {floor['choices']} equally "
            f"likely tone, opening and closing choices). Training past the floor lowered the loss no further but left "
            f"DPO less to do: after {longest} steps it gained {pm(*rows[longest]['gain'], 2)}, its KL fell to "
            f"{rows[longest]['kl'][0]:.2f} nats and its held-out margin to {rows[longest]['dpo_margin'][0]:.2f}, in the "
            f"same {record['dpo']['max_iters']} DPO steps. Stopping short hurt too: after {shortest} steps the gain was "
            f"{pm(*rows[shortest]['gain'], 2)}, at a KL of {rows[shortest]['kl'][0]:.1f} nats. So train SFT until its "
            f"held-out loss flattens, and no longer. DPO's budget was fixed here; a longer DPO run might win back some "
            f"of the gain, which we did not measure.")


# ----------------------------------------------------------------------------------------------------
# Beta: results/beta-frontier.json (python -m experiments.beta_frontier)

def beta_table():
    record = load("beta-frontier.json")
    summary = record["summary"]
    rows = []
    for family in record["families"]:
        cells = []
        for step in record["steps"]:
            s = summary[f"{family}@{step}"]
            cells.append(f"{pm(s['oracle_reward'], s['oracle_reward_se'], 2)} ({s['kl']:.2f})")
        rows.append([family.replace("beta", "β ").replace("-lr", ", lr "), *cells])
    sft = summary["sft"]
    return markdown(["run"] + [f"step {step}" for step in record["steps"]], rows) + \
        f"\n\nEach cell: oracle reward ± one standard error over the 200 prompts (its KL in nats). The SFT " \
        f"model itself: {pm(sft['oracle_reward'], sft['oracle_reward_se'], 2)}."


def beta_points(record, family):
    return [(step, record["summary"][f"{family}@{step}"]) for step in record["steps"]]


def beta_finding():
    record = load("beta-frontier.json")
    families = [f for f in record["families"] if "-lr" not in f]  # the demo's lr
    name = {f: f"β {f[4:]}" for f in families}
    points = {f: beta_points(record, f) for f in families}
    peak = {f: max(points[f], key=lambda p: p[1]["oracle_reward"]) for f in families}
    final = {f: points[f][-1][1] for f in families}
    fell = [f for f in families if final[f]["oracle_reward"] < peak[f][1]["oracle_reward"] - 2 * final[f]["oracle_reward_se"]
            and final[f]["kl"] > peak[f][1]["kl"]]
    best = max(families, key=lambda f: peak[f][1]["oracle_reward"])
    tight = families[-1]
    last = record["steps"][-1]
    pulls = {f: 1 / (1 + math.exp(record["curves"][f][-1]["rewards/margin"])) for f in families}  # sigma(-beta h)
    assert fell and tight not in fell and final[tight]["kl"] < min(final[f]["kl"] for f in families[:-1])
    fell_text = " and ".join(name[f] for f in fell)
    fell_kls = ", ".join(f"{final[f]['kl']:.1f}" for f in fell)
    return (f"{fell_text} peaked and then fell back: by step {last} their reward had dropped "
            f"({', '.join(pm(final[f]['oracle_reward'], final[f]['oracle_reward_se'], 2) for f in fell)}) while their KL "
            f"kept climbing ({fell_kls} nats). {name[best]} climbed "
            f"highest, to {pm(peak[best][1]['oracle_reward'], peak[best][1]['oracle_reward_se'], 2)} at a KL of "
            f"{peak[best][1]['kl']:.1f}. {name[tight]} held the policy within {final[tight]['kl']:.2f} nats, and its "
            f"reward stopped at {final[tight]['oracle_reward']:.2f}: a large β is a short leash. By step {last} "
            f"the pull σ(−βh) at the held-out pairs' mean margin was {pulls[families[0]]:.2f} at {name[families[0]]} and "
            f"{pulls[tight]:.2f} at {name[tight]}: with a large β each nat of h counts more, so the pull fades "
            f"after a shorter way.")


def curves_finding():
    record = load("beta-frontier.json")
    fast, slow = record["curves"]["beta0.1"], record["curves"]["beta0.1-lr2e-5"]
    top = max(fast, key=lambda r: r["logps/chosen"])
    first_perfect = next(r["iter"] for r in fast if r["rewards/accuracy"] == 1.0)
    assert fast[0]["logps/chosen"] < top["logps/chosen"] and fast[-1]["logps/chosen"] < fast[0]["logps/chosen"]
    assert fast[-1]["logps/rejected"] < fast[-1]["logps/chosen"] - 10
    peak_step = max(beta_points(record, "beta0.1"), key=lambda p: p[1]["oracle_reward"])[0]
    assert peak_step < record["steps"][-1]
    return (f"In this run (one seed), at the demo's lr, the held-out loss falls from ln 2 to {fast[-1]['loss']:.2f}, and accuracy is 1.00 from "
            f"step {first_perfect} on. `logps/chosen` first rises, to {top['logps/chosen']:.1f} at step {top['iter']}, "
            f"then falls to {fast[-1]['logps/chosen']:.1f} ({fast[-1]['logps/chosen'] - fast[0]['logps/chosen']:+.1f} "
            f"nats from the reference's), while `logps/rejected` plunges to {fast[-1]['logps/rejected']:.1f}: from "
            f"then on the margin grows partly by taking probability from both replies, and section 7 shows the "
            f"reward falling back after step {peak_step}. At a fifth of the lr every curve moves slowly (`rewards/margin` "
            f"{slow[-1]['rewards/margin']:.2f} at step {slow[-1]['iter']}, against {fast[-1]['rewards/margin']:.2f}).")


# ----------------------------------------------------------------------------------------------------
# The exercises: results/exercises.json (python -m experiments.exercises)

def exercise_diff(name):
    return "```diff\n" + diff(name) + "\n```"


def exercise_diffs():
    """Every exercise's edit, numbered, in one diff block."""
    return "```diff\n" + "\n".join(f"{i}. {diff(name)}" for i, name in enumerate(EXERCISES, 1)) + "\n```"


def exercise_number(name):
    r = load("exercises.json")[name]
    if name == "mean":
        s, m = r["sum"], r["mean"]
        assert m["margin"] < s["margin"] / 5 and abs(m["reward"] - s["reward"]) < 0.1
        return (f"The held-out margin β h after the demo's run is {m['margin']:.3f} with the mean, against "
                f"{s['margin']:.3f} with the sum, {s['margin'] / m['margin']:.0f} times smaller: divided by the reply's "
                f"length, so the same β is a constraint that many times weaker, and pairs whose replies differ in "
                f"length are weighed differently. The policy itself is much the same (oracle reward {m['reward']:.2f} "
                f"against {s['reward']:.2f}, KL {m['kl']:.2f} against {s['kl']:.2f}): AdamW's steps do not depend on "
                f"the gradient's overall scale, and the toy replies are nearly all one length.")
    if name == "moving-reference":
        assert max(r["losses"]) - min(r["losses"]) < 1e-6 and r["kl"] > 0.5
        return (f"The held-out loss reads {r['losses'][0]:.4f} = ln 2 at every evaluation: h ≡ 0. Yet the policy "
                f"moves, {r['kl']:.2f} nats (oracle reward {r['reward']:.2f}): the reference's log-probs are "
                f"computed without gradient, so the gradient is the pull at h = 0, σ(0) = ½, on every pair, and it "
                f"never fades. The loss curve says nothing is learned while the brake that β provides is gone.")
    if name == "no-prompt-mask":
        assert abs(r["dpo_loss"] - r["dpo_loss_masked"]) < 1e-5 and r["prompt_nll"] < r["prompt_nll_masked"] / 5
        return (f"DPO does not notice: its held-out loss is {r['dpo_loss']:.7f}, against {r['dpo_loss_masked']:.7f} "
                f"with the mask (the prompt cancels in h; the difference is rounding). SFT does: the model gives "
                f"the held-out prompts {r['prompt_nll']:.2f} nats a token, against {r['prompt_nll_masked']:.1f} with "
                f"the mask. It has learned to write the user's side of the dialogue.")
    if name == "no-eos":
        assert r["length"] > 0.9 * r["max_new_tokens"]
        return (f"The SFT model's samples are {r['length']:.1f} tokens long on average, against "
                f"{r['length_with_eos']:.1f} with EOS: they run to the {r['max_new_tokens']}-token limit.")
    if name == "per-micro-batch-mean":
        one, micro, wrong = r["one batch"], r["4 micro-batches"], r["4 micro-batches (broken)"]
        assert abs(one - micro) < 1e-5 < abs(wrong - one)
        return (f"The first step's gradient norm: {one:.6f} for one batch of 32, {micro:.6f} for 4 micro-batches "
                f"of 8 (the same, to rounding), and {wrong:.6f} with each micro-batch's own mean, {abs(wrong - one) / one:.2%} "
                f"off. Small here, because the toy replies are nearly all the same length; the more lengths differ, "
                f"the more a token of a short micro-batch outweighs one of a long one.")
    if name == "high-lr":
        drop = r["logps_chosen"][0] - min(r["logps_chosen"])
        assert drop > 5
        return (f"At lr {r['lr']:g}, held-out `logps/chosen` falls from {r['logps_chosen'][0]:.1f} to "
                f"{min(r['logps_chosen']):.1f} nats, past the 5 nats at which `dpo.py` warns; the policy moves "
                f"{r['kl']:.0f} nats from the reference, and its oracle reward is {r['reward']:.2f}, against "
                f"{load('exercises.json')['mean']['sum']['reward']:.2f} at the demo's lr.")
    raise KeyError(name)


# ----------------------------------------------------------------------------------------------------
# docs/gpu.md and docs/performance.md

def memory_table():
    by_model = {}
    for row in rows_of():
        by_model.setdefault(row["model"], {})[row["mode"]] = row
    sizes = {"gpt2": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1.56B"}
    rows = []
    for name, modes in by_model.items():
        live = modes["reference live"]
        fits = ", ".join(f"{card} GB" for card in CARDS_GIB if card in live["fits"]) or "none"
        checkpointed = modes["--grad_checkpoint"]
        rows.append([f"{name} ({sizes[name]})", f"{live['peak_gib']:.1f} GiB", f"{modes['--precompute_ref']['peak_gib']:.1f} GiB",
                     f"{checkpointed['peak_gib']:.1f} GiB", fits,
                     ", ".join(f"{card} GB" for card in CARDS_GIB if card in checkpointed["fits"]) or "none"])
    return markdown(["model", "reference live", "`--precompute_ref`", "`--grad_checkpoint`", "fits (reference live)",
                     "fits with `--grad_checkpoint`"], rows, ["---", "---:", "---:", "---:", "---", "---"])


def performance_trl():
    trl = load("performance.json")["trl"]
    rows = [[name, f"{seconds:.3f}", f"{mib:,}"] for name, seconds, mib in trl["rows"]]
    _, theirs, their_mib = trl["rows"][-1]
    for name, seconds, mib in trl["rows"][:-1]:
        rows.append([f"{name.split(' ', 1)[1]} / TRL", f"**{seconds / theirs:.3f}**", f"**{mib / their_mib:.3f}**"])
    return (markdown(["", "seconds per DPO step", "peak RSS (MiB)"], rows) +
            f"\n\n`{trl['command']}`, {trl['date']}; {trl['versions']}; {trl['load']}.")


def performance_bench():
    bench = load("performance.json")["bench"]
    rows = [[step, f"{ms:,}", f"{tokens:,}", f"{tflops:.2f}", f"{mfu:.1%}", f"{mb:,} MB"]
            for step, ms, tokens, tflops, mfu, mb in bench["rows"]]
    return markdown(["step", "ms", "tokens/s", "TFLOP/s", "MFU", "peak RSS"], rows) + \
        f"\n\nThe measured peak of a 2048 × 2048 fp32 matmul: {bench['peak_tflops']:.2f} TFLOP/s."


def performance_memory_check():
    rows = [[precision, checkpointing, fused, reference, f"{measured:.1f}", f"{computed:.1f}", f"{measured / computed:.3f}"]
            for precision, checkpointing, fused, reference, measured, computed in load("performance.json")["memory_check"]["rows"]]
    return markdown(["precision", "`--grad_checkpoint`", "fused AdamW", "reference", "measured MiB", "computed MiB",
                     "ratio"], rows, ["---", "---", "---", "---", "---:", "---:", "---:"])


def performance_torchrun():
    rows = [[name, f"{tokens:,}", f"{seconds:.2f}", f"{whole:.1f} s"] for name, tokens, seconds, whole
            in load("performance.json")["torchrun"]["rows"]]
    return markdown(["", "tokens/s (steps 4 to 12)", "seconds per step", "whole run"], rows)


# ----------------------------------------------------------------------------------------------------
# What DPO replaced: results/frontier.json (python -m experiments.frontier)

METHOD_ORDER = ("DPO, offline pairs", "DPO, on-policy pairs", "PPO", "PPO-GT", "Preferred-FT", "Best-of-N")


def frontier_points(record, method):
    """(kl, kl_se, reward, reward_se) of every point of a method: each run's checkpoints, or best-of-N's N."""
    if method == "Best-of-N":
        return [tuple(v[:4]) for k, v in record["points"].items() if k.startswith("N=")]
    return [tuple(v[:4]) for k, v in record["points"].items() if k.split(" @ ")[0] in record["runs"][method]]


def frontier_best():
    record = load("frontier.json")
    rows = []
    for method in METHOD_ORDER:
        points = frontier_points(record, method)
        cells = []
        for limit in (1, 3, 10):
            within = [p for p in points if p[0] <= limit]
            best = max(within, key=lambda p: p[2]) if within else None
            cells.append(pm(best[2], best[3], 2) + f" (KL {best[0]:.1f})" if best else "none")
        rows.append([method] + cells)
    sft = record["points"]["sft"]
    return markdown(["method", "KL ≤ 1 nat", "KL ≤ 3 nats", "KL ≤ 10 nats"], rows) + \
        f"\n\nThe SFT model itself: {pm(sft[2], sft[3], 2)}."


def run_path(record, label):
    """[(step, kl, reward, reward_se)] of one run, in step order."""
    return sorted((int(k.rsplit(" @ ", 1)[1]), v[0], v[2], v[3]) for k, v in record["points"].items()
                  if k.startswith(label + " @ "))


def collapsed(path):
    """Reward falling back while KL runs away: the final reward two standard errors below the run's best
    checkpoint, at a higher KL."""
    best = max(path, key=lambda p: p[2])
    final = path[-1]
    return final[2] < best[2] - 2 * final[3] and final[1] > best[1]


def frontier_stability_and_cost():
    """Per method: its best setting; the final reward over the seeds and their range; runs diverged or
    collapsed; tokens through the model and wall-clock per run (its own first stage included)."""
    record = load("frontier.json")
    tokens, wall = record["tokens"], record["wall_s"]
    shared = {"PPO": ["reward model"], "DPO, on-policy pairs": ["on-policy pairs"]}  # each method's own first stage
    rows = []
    for method in METHOD_ORDER[:-1]:
        runs = record["runs"][method]
        best = runs[record["best"][method]]
        same = [label for label, run in runs.items() if run["lr"] == best["lr"] and run["setting"] == best["setting"]]
        finals = [run_path(record, label)[-1][2] for label in same if run_path(record, label)] or [math.nan]
        setting = f"lr {best['lr']:g}" + (f", {'β' if method.startswith('DPO') else 'KL coef'} {best['setting']:g}"
                                         if best["setting"] is not None else "")
        diverged = sum(run["diverged"] for run in runs.values())
        fell = sum(collapsed(run_path(record, label)) for label in runs if len(run_path(record, label)) > 1)
        parts = [method] + shared.get(method, [])
        forward = sum(tokens.get(p, [0, 0])[0] for p in parts) / len(runs)
        backward = sum(tokens.get(p, [0, 0])[1] for p in parts) / len(runs)
        seconds = sum(wall.get(p, 0.0) for p in parts) / len(runs)
        rows.append([method, setting, f"{pm(*mean_and_sem(finals), 2)} ({len(finals)})",
                     f"{min(finals):.2f} to {max(finals):.2f}", f"{diverged}, {fell} of {len(runs)}",
                     f"{forward / 1e6:.2f}M / {backward / 1e6:.2f}M", f"{seconds:.0f} s"])
    n_tokens = tokens.get("Best-of-N", [0, 0])  # sampling only, at every N at once (its time is not kept)
    rows.append(["Best-of-N", f"N up to {max(int(k[2:]) for k in record['points'] if k.startswith('N='))}", "", "",
                 "", f"{n_tokens[0] / 1e6:.2f}M / 0", ""])
    return markdown(["method", "best setting", "final reward (seeds)", "range", "runs diverged, collapsed",
                     "tokens a run: forward / backward", "wall-clock a run"], rows,
                    ["---", "---", "---:", "---:", "---:", "---:", "---:"])


def best_within(record, method, limit):
    """The point of a method with the highest reward at KL <= limit: (kl, kl_se, reward, reward_se), or None."""
    within = [p for p in frontier_points(record, method) if p[0] <= limit]
    return max(within, key=lambda p: p[2]) if within else None


def frontier_finding():
    """What the frontier shows, in words made from its numbers: DPO against PPO and PPO-GT within each KL
    budget, on-policy against offline pairs, the seeds' spread, and the compute."""
    record = load("frontier.json")
    dpo_methods = ("DPO, offline pairs", "DPO, on-policy pairs")
    sentences, trailed = [], False
    for limit in (1, 3, 10):
        dpo = max(((best_within(record, m, limit), m) for m in dpo_methods if best_within(record, m, limit)),
                  key=lambda t: t[0][2], default=None)
        gt, ppo = best_within(record, "PPO-GT", limit), best_within(record, "PPO", limit)
        if dpo is None or gt is None:
            continue
        point, which = dpo
        gap = point[2] - gt[2]
        noise = 2 * math.hypot(point[3], gt[3])
        verdict = "beat" if gap > noise else "trailed" if gap < -noise else "tied with"
        text = (f"Within {limit} nat{'s' if limit > 1 else ''} of KL the best DPO ({which.split(', ')[1]}) reached "
                f"{pm(point[2], point[3], 2)} and {verdict} PPO-GT ({pm(gt[2], gt[3], 2)})")
        if ppo:
            text += f"; PPO on its learned reward reached {pm(ppo[2], ppo[3], 2)}"
        sentences.append(text + ".")
        if verdict == "trailed" and not trailed:
            trailed = True
            sentences.append("PPO-GT is trained on the true reward of its own samples, with a KL price it pays "
                             "token by token, while DPO sees only the labels of fixed pairs; we think that is "
                             "why it gets further for the same KL here.")
    offline, onpolicy = (best_within(record, m, 10) for m in dpo_methods)
    near = [best_within(record, m, 1) for m in dpo_methods]
    if offline and onpolicy and all(near):
        gap = onpolicy[2] - offline[2]
        noise = 2 * math.hypot(onpolicy[3], offline[3])
        word = "above" if gap > noise else "below" if gap < -noise else "level with"
        gap1, noise1 = near[1][2] - near[0][2], 2 * math.hypot(near[1][3], near[0][3])
        word1 = "above" if gap1 > noise1 else "below" if gap1 < -noise1 else "level with"
        sentences.append(f"DPO on π_SFT's own samples, labelled by the oracle, ended {word} DPO on the toy task's "
                         f"fixed pairs (best within 10 nats: {onpolicy[2]:.2f} against {offline[2]:.2f}); within 1 nat "
                         f"it was {word1} them ({near[1][2]:.2f} against {near[0][2]:.2f}).")
    ft, bon = best_within(record, "Preferred-FT", 10), best_within(record, "Best-of-N", 10)
    bon_n = next(k for k, v in record["points"].items() if k.startswith("N=") and tuple(v[:4]) == bon)
    sentences.append(f"Preferred-FT, plain SFT on the chosen replies, reached {pm(ft[2], ft[3], 2)} at a KL of "
                     f"{ft[0]:.1f}: on this task the chosen replies are simply the polite ones, so imitating them "
                     f"is enough. Best-of-N needed no training at all: {bon_n} reached {pm(bon[2], bon[3], 2)} "
                     f"(KL at most {bon[0]:.1f}), paid for with {bon_n[2:]} samples a prompt at every use.")
    spreads, fell, diverged = {}, [], 0
    for method in ("DPO, offline pairs", "DPO, on-policy pairs", "PPO", "PPO-GT"):
        runs = record["runs"][method]
        best = runs[record["best"][method]]
        same = [label for label, run in runs.items() if run["lr"] == best["lr"] and run["setting"] == best["setting"]]
        finals = [run_path(record, label)[-1][2] for label in same if run_path(record, label)]
        spreads[method] = max(finals) - min(finals)
        diverged += sum(run["diverged"] for run in runs.values())
        n_fell = sum(collapsed(run_path(record, label)) for label in runs if len(run_path(record, label)) > 1)
        fell += [f"{n_fell} of {len(runs)} {method} runs"] if n_fell else []
    sentences.append(f"Stability: across three seeds at the best setting the final reward spread over " +
                     ", ".join(f"{spreads[m]:.2f} ({m})" for m in spreads) + "; " +
                     (f"{diverged} runs diverged" if diverged else "no run diverged") + ", and " +
                     (" and ".join(fell) + " collapsed" if fell else "none collapsed") + ".")
    beta = load("beta-frontier.json")
    top = max((v for k, v in beta["summary"].items() if k != "sft"), key=lambda v: v["oracle_reward"])
    top_name = max((k for k in beta["summary"] if k != "sft"), key=lambda k: beta["summary"][k]["oracle_reward"])
    sentences.append(f"Every method had {record['steps'][-1]} steps here, short for DPO: section 7's runs, with "
                     f"{beta['steps'][-1]}, got offline DPO to {pm(top['oracle_reward'], top['oracle_reward_se'], 2)} "
                     f"({top_name.replace('beta', 'β ').replace('@', ' at step ')}, KL {top['kl']:.1f}).")
    tokens, wall = record["tokens"], record["wall_s"]
    def per_run(method, parts):
        n = len(record["runs"][method])
        return (sum(tokens.get(p, [0, 0])[0] for p in parts) / n, sum(wall.get(p, 0.0) for p in parts) / n)
    dpo_cost = per_run("DPO, offline pairs", ["DPO, offline pairs"])
    ppo_cost = per_run("PPO", ["PPO", "reward model"])
    sentences.append(f"A PPO run (with its share of the reward model) put {ppo_cost[0] / dpo_cost[0]:.1f}x the tokens "
                     f"through the model of an offline DPO run and took {ppo_cost[1] / dpo_cost[1]:.1f}x its wall-clock.")
    return " ".join(sentences)


def frontier_lines():
    lines = load("frontier.json")["lines"]
    return f"{lines['DPO']} lines (dpo.py: the loss, the log-probs of a pair, the micro-batch) against {lines['RLHF']} " \
           "(rlhf.py: the reward model, its loss and loop, rollouts, rewards with the KL penalty, GAE, the clipped " \
           "objective, the value loss, the PPO loop)"


EXERCISES = ("mean", "moving-reference", "no-prompt-mask", "no-eos", "per-micro-batch-mean")
TABLES = {"demo": demo_table, "sft-length": sft_length_table, "beta": beta_table,
          **{f"exercise.{name}": (lambda name=name: exercise_diff(name)) for name in EXERCISES}, "exercises": exercise_diffs,
          "memory": memory_table, "performance.trl": performance_trl,
          "performance.bench": performance_bench, "performance.memory-check": performance_memory_check,
          "performance.torchrun": performance_torchrun, "frontier.best": frontier_best,
          "frontier.cost": frontier_stability_and_cost}
NUMBERS = {"demo.gain": demo_gain, "demo.seconds": demo_seconds, "demo.beta5": demo_beta5, "demo.pairs-seen": demo_pairs_seen,
           "demo.bad-accuracy": demo_bad_accuracy,
           "demo.sft-steps": demo_sft_steps, "suite.summary": suite_summary,
           "sft-length.finding": sft_length_finding, "beta.finding": beta_finding, "curves.finding": curves_finding,
           **{f"exercise.{name}": (lambda name=name: exercise_number(name)) for name in EXERCISES + ("high-lr",)},
           "performance.note": lambda: load("performance.json")["note"], "frontier.lines": frontier_lines,
           "frontier.finding": frontier_finding,
           "frontier.minutes": lambda: f"{load('frontier.json')['total_s'] / 60:.0f}"}


# ----------------------------------------------------------------------------------------------------
# Rewriting and checking the Markdown

def documents():
    return [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def render(text, path="text"):
    """text with every table and number made afresh; raises KeyError naming an unknown one."""
    def replace(match):
        opening, kind, name, _, closing = match.groups()
        makers = TABLES if kind == "table" else NUMBERS
        if name not in makers:
            raise KeyError(f"{path}: no {kind} named {name!r} in experiments/tables.py")
        made = makers[name]()
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
            sys.exit(f"{os.path.relpath(error.filename, ROOT)} is missing: results/README.md names the script "
                     "that makes it; nothing was written")
        for path, text in made.items():
            if text != texts[path]:
                with open(path + ".tmp", "w", encoding="utf-8") as f:
                    f.write(text)
                os.replace(path + ".tmp", path)
    stale = [f"{os.path.relpath(path, ROOT)}: {name}" for path, text in texts.items()
             for name in (differences(text, path) if argv == ["--check"] else [])]
    if stale:
        sys.exit("these differ from what results/ gives (run python -m experiments.tables --write): " + ", ".join(stale))


if __name__ == "__main__":
    main()
