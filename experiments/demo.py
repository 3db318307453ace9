"""The README's demo, run as a user runs it and timed: its four commands, one after the other, each a fresh
process, in a scratch folder (so that out/demo starts empty); then its samples become results/demo.md,
.json and .jsonl, and the times results/demo-time.json. Then, untimed: the worked example of README section 1
(the first held-out pair under the demo's SFT and DPO models) -> results/worked-example.json, and the README's
"turn a knob" variant (KNOB, then sample.py --demo again, every run side by side) -> results/demo-knob.json;
and the demo once more with one thread instead of two, to show how far another machine's rounding moves it
-> results/demo-threads.json.

    python -m experiments.demo
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import dpo
from data import dpo_batch, load_preferences, tokenize_pairs
from machinery.models import open_model
from machinery.results import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = {"sft": ["sft.py", "--demo"], "dpo": ["dpo.py", "--demo", "--beta", "0.1"],
            "dpo-bad": ["dpo.py", "--demo", "--beta", "0.1", "--swap"],
            "sample": ["sample.py", "--demo"]}
KNOB = ["dpo.py", "--demo", "--beta", "5"]  # writes out/demo/dpo-beta5.0 beside the demo's runs


def main():
    seconds = {}
    with tempfile.TemporaryDirectory() as scratch:
        for stage, (script, *flags) in COMMANDS.items():
            started = time.perf_counter()
            subprocess.run([sys.executable, os.path.join(ROOT, script), *flags], cwd=scratch, check=True,
                           env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.DEVNULL)
            seconds[stage] = time.perf_counter() - started
            print(f"{stage}: {seconds[stage]:.1f} s", flush=True)
        for extension in (".md", ".json", ".jsonl"):
            shutil.copy(os.path.join(scratch, "out", "demo", "samples" + extension),
                        os.path.join(ROOT, "results", "demo" + extension))
        worked_example(os.path.join(scratch, "out", "demo"))
        for script, *flags in (KNOB, ["sample.py", "--demo", "--name", "knob", "--show", "0"]):
            subprocess.run([sys.executable, os.path.join(ROOT, script), *flags], cwd=scratch, check=True,
                           env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.DEVNULL)
        with open(os.path.join(scratch, "out", "demo", "knob.json")) as f:
            knob = json.load(f)
        with open(os.path.join(ROOT, "results", "demo-knob.json"), "w") as f:
            json.dump({"command": "python " + " ".join(KNOB), "summary": knob["summary"]}, f, indent=1)
    record = {"commands": {stage: "python " + " ".join(command) for stage, command in COMMANDS.items()},
              "seconds": seconds, "machine": machine()}
    with open(os.path.join(ROOT, "results", "demo-time.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(f"the demo took {sum(seconds.values()):.0f} s; wrote results/demo.md, .json, .jsonl and demo-time.json")
    one_thread()


def one_thread():
    """The whole demo again with one thread (OMP_NUM_THREADS=1), as another machine might run it: the same code,
    summed in another order -> results/demo-threads.json."""
    with tempfile.TemporaryDirectory() as scratch:
        for script, *flags in COMMANDS.values():
            subprocess.run([sys.executable, os.path.join(ROOT, script), *flags], cwd=scratch, check=True,
                           env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
        with open(os.path.join(scratch, "out", "demo", "samples.json")) as f:
            record = json.load(f)
    with open(os.path.join(ROOT, "results", "demo-threads.json"), "w") as f:
        json.dump({"threads": 1, "summary": record["summary"], "machine": record["machine"]}, f, indent=1)


@torch.no_grad()
def worked_example(demo_dir, beta=0.1):
    """README section 1's pair, worked by hand: the first held-out toy pair's summed log-probs under the SFT model
    (the reference) and the DPO model, and what eq. 7 makes of them."""
    pair = load_preferences("toy", "test")[0]
    tokens = tokenize_pairs([pair], dpo.DEMO["max_len"], dpo.DEMO["max_len"] // 2, verbose=False)
    batch = dpo_batch(tokens)
    ref_chosen, ref_rejected = (x.item() for x in dpo.pair_logps(open_model(f"{demo_dir}/sft").eval(), batch))
    chosen, rejected = (x.item() for x in dpo.pair_logps(open_model(f"{demo_dir}/dpo").eval(), batch))
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    record = {"pair": pair, "beta": beta, "ref_chosen": ref_chosen, "ref_rejected": ref_rejected, "chosen": chosen,
              "rejected": rejected, "h": h, "beta_h": beta * h, "loss": -F.logsigmoid(torch.tensor(beta * h)).item(),
              "pull": torch.sigmoid(torch.tensor(-beta * h)).item(), "tokens": {k: len(v) for k, v in tokens[0].items()},
              "machine": machine()}
    with open(os.path.join(ROOT, "results", "worked-example.json"), "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
