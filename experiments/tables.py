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


def mean_and_sem(values):
    from machinery.results import mean_and_sem as compute
    return compute(values)


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


TABLES = {"demo": demo_table}
NUMBERS = {"demo.gain": demo_gain, "demo.seconds": demo_seconds}


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
    made = {m.group(3): m.group(4) for m in BLOCK.finditer(render(text, path))}
    return [m.group(3) for m in BLOCK.finditer(text) if made[m.group(3)] != m.group(4)]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv not in (["--write"], ["--check"]):
        sys.exit("usage: python -m experiments.tables --write | --check")
    stale = []
    for path in documents():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if argv == ["--write"]:
            with open(path, "w", encoding="utf-8") as f:
                f.write(render(text, path))
        else:
            stale += [f"{os.path.relpath(path, ROOT)}: {name}" for name in differences(text, path)]
    if stale:
        sys.exit("these differ from what results/ gives (run python -m experiments.tables --write): " + ", ".join(stale))


if __name__ == "__main__":
    main()
