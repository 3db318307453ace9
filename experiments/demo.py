"""The README's demo, run as a user runs it and timed: its four commands, one after the other, each a fresh
process, in a scratch folder (so that out/demo starts empty); then its samples become results/demo.md,
.json and .jsonl, and the times results/demo-time.json.

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
COMMANDS = {"sft": ["sft.py", "--demo"], "dpo": ["dpo.py", "--demo"], "dpo-bad": ["dpo.py", "--demo", "--swap"],
            "sample": ["sample.py", "--demo"]}


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
    record = {"commands": {stage: "python " + " ".join(command) for stage, command in COMMANDS.items()},
              "seconds": seconds, "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
              "machine": platform.machine()}
    with open(os.path.join(ROOT, "results", "demo-time.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(f"the demo took {sum(seconds.values()):.0f} s; wrote results/demo.md, .json, .jsonl and demo-time.json")


if __name__ == "__main__":
    main()
