"""machinery/compute.keep_freed_memory, measured: the demo's SFT step with glibc's default thresholds and with the
ones that keep freed memory in the process, each in fresh processes, alternating.

    python -m benchmarks.allocator          # 3 runs of each, 30 steps a run; about 2 minutes on 2 cores
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile

import sft
from machinery import compute
from machinery.cli import ArgumentParser

STEPS = 30


def child(mode, out_dir):
    """One SFT run of STEPS demo steps in this process; prints its median step time (the last two thirds) and
    peak resident memory as JSON."""
    if mode == "default":
        compute.keep_freed_memory = lambda: None  # glibc's own thresholds
    sft.main(["--demo", "--max_iters", str(STEPS), "--eval_interval", "0", "--eval_batches", "1", "--out_dir", out_dir])
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        steps = [json.loads(line) for line in f if '"train"' in line]
    times = [r["dt_ms"] for r in steps[STEPS // 3:]]
    print(json.dumps({"mode": mode, "ms": statistics.median(times),
                      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main(argv=None):
    p = ArgumentParser(prog="python -m benchmarks.allocator", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3, help="runs of each mode (default: 3)")
    p.add_argument("--child", choices=["default", "kept"], help=argparse.SUPPRESS)
    p.add_argument("--out_dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.out_dir)
        return
    results = {"default": [], "kept": []}
    with tempfile.TemporaryDirectory() as scratch:
        for run in range(args.runs):
            for mode in results:
                out_dir = os.path.join(scratch, f"{mode}-{run}")
                done = subprocess.run([sys.executable, "-m", "benchmarks.allocator", "--child", mode, "--out_dir",
                                       out_dir], capture_output=True, text=True, check=True)
                results[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
    summary = {mode: {"ms": statistics.median(r["ms"] for r in rows), "peak_mb": statistics.median(r["peak_mb"] for r in rows)}
               for mode, rows in results.items()}
    print(json.dumps({"command": "python -m benchmarks.allocator", "steps": STEPS, "runs": args.runs, **summary}))


if __name__ == "__main__":
    main()
