"""The test suite, run as the README gives it and timed: its counts and wall-clock -> results/suite.json, the
summary docs/testing.md shows.

    python -m experiments.suite
"""
import json
import os
import re
import subprocess
import sys
import time

from machinery.results import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = [sys.executable, "-m", "pytest", "-q", "tests"]


def main():
    started = time.perf_counter()
    done = subprocess.run(COMMAND, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    last = done.stdout.strip().splitlines()[-1]
    print(last)
    if done.returncode != 0:
        sys.exit(f"the suite failed (exit {done.returncode}): nothing written")
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|skipped|failed|deselected)", last)}
    record = {"command": "python -m pytest -q tests", "counts": counts, "seconds": seconds, "machine": machine()}
    with open(os.path.join(ROOT, "results", "suite.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote results/suite.json: {seconds:.0f} s")


if __name__ == "__main__":
    main()
