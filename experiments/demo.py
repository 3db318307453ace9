"""The README's demo, run as a user runs it and timed: its four commands, one after the other, each a fresh
process, in a scratch folder (so that out/demo starts empty); then its samples become results/demo.md,
.json and .jsonl, and the times results/demo-time.json. Then, untimed, the README's "turn a knob" variant
(KNOB, then sample.py --demo again, every run side by side) -> results/demo-knob.json.

    python -m experiments.demo
"""
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

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
        for script, *flags in (KNOB, ["sample.py", "--demo", "--name", "knob", "--show", "0"]):
            subprocess.run([sys.executable, os.path.join(ROOT, script), *flags], cwd=scratch, check=True,
                           env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.DEVNULL)
        with open(os.path.join(scratch, "out", "demo", "knob.json")) as f:
            knob = json.load(f)
        with open(os.path.join(ROOT, "results", "demo-knob.json"), "w") as f:
            json.dump({"command": "python " + " ".join(KNOB), "summary": knob["summary"]}, f, indent=1)
    record = {"commands": {stage: "python " + " ".join(command) for stage, command in COMMANDS.items()},
              "seconds": seconds, "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
              "machine": platform.machine()}
    with open(os.path.join(ROOT, "results", "demo-time.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(f"the demo took {sum(seconds.values()):.0f} s; wrote results/demo.md, .json, .jsonl and demo-time.json")


if __name__ == "__main__":
    main()
