"""Seconds per DPO step and peak memory: our dpo.py against TRL's DPOTrainer, on the same workload.

    pip install trl                                     # only this comparison needs it
    python -m benchmarks.compare_trl                    # both sides; ~10 minutes on 2 CPU cores
    python -m benchmarks.compare_trl --chunked_head --share_prompt   # and our side with each of these flags
    python -m benchmarks.compare_trl --ours_only        # no trl needed

The workload (benchmarks/workload.py, built under --workload on first use): 400 real HH-RLHF pairs that
fit in 256 tokens and a random 6-layer x 384 GPT-2-architecture model with GPT-2's vocabulary; CPU, fp32,
batch 4 pairs, beta 0.1, AdamW (TRL's default; dpo.py's is RMSprop), no accumulation. Each side runs as a whole process for --short and for --long
optimizer steps; (t_long - t_short) / (long - short) is its steady seconds per step, free of start-up
costs (imports, loading, tokenizing, the end-of-run evaluation and save), and the longer run's peak
resident memory is its peak. Our dpo.py holds out every 20th pair as its test split (380 train pairs),
TRL trains on all 400; both draw 4 pairs a step. The machine's load average is printed beside the
numbers: on a shared machine, compare runs made under similar load.
"""
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks import workload
from machinery import UserError
from machinery.cli import ArgumentParser, HelpFormatter, description, user_errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BATCH_PAIRS = 4


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m benchmarks.compare_trl", description=description(__doc__), formatter_class=HelpFormatter)
    p.add_argument("--workload", default=os.path.join(ROOT, "out", "trl-workload"),
                   help="where the workload is built and kept (default: out/trl-workload)")
    p.add_argument("--share_prompt", action="store_true", help="our side also with dpo.py --share_prompt")
    p.add_argument("--chunked_head", action="store_true", help="our side also with dpo.py --chunked_head")
    p.add_argument("--ours_only", action="store_true", help="measure our side only (no trl needed)")
    p.add_argument("--short", type=int, default=2, help="steps of the shorter run")
    p.add_argument("--long", type=int, default=10, help="steps of the longer run")
    args = p.parse_args(argv)
    if not 1 <= args.short < args.long:
        p.error(f"--short {args.short} and --long {args.long}: need 1 <= short < long")
    return args


def ours_command(checkpoint, pairs, steps, out_dir, extra=()):
    """dpo.py with the workload's settings, and extra flags; a fresh out_dir each run (a run never continues
    another)."""
    command = [sys.executable, os.path.join(ROOT, "dpo.py"), "--init", checkpoint, "--data", pairs,
               "--batch_size", str(BATCH_PAIRS), "--grad_accum", "1", "--max_len", str(workload.MAX_TOKENS),
               "--max_iters", str(steps), "--lr", "1e-6", "--beta", "0.1", "--optimizer", "adamw", "--device", "cpu",
               "--dtype", "float32", "--eval_interval", "0", "--out_dir", out_dir]
    return command + list(extra)


def trl_command(workload_dir, steps):
    return [sys.executable, "-m", "benchmarks.trl_dpo", "--workload", workload_dir, "--steps", str(steps),
            "--batch_size", str(BATCH_PAIRS)]


def timed(command, log_path):
    """Wall seconds and peak resident memory (MiB) of one whole run; its output goes to log_path."""
    t0 = time.time()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)  # the child's own resource usage, peak RSS included
    seconds = time.time() - t0
    exit_code = os.waitstatus_to_exitcode(status)
    if exit_code != 0:
        raise UserError(f"`{' '.join(command)}` exited with {exit_code}; its output is in {log_path}")
    return seconds, usage.ru_maxrss / 1024  # Linux reports KiB


def per_step(make_command, args, name, scratch):
    """Steady seconds per step and the peak RSS of the longer run."""
    runs = {}
    for steps in (args.long, args.short):
        runs[steps] = timed(make_command(steps), os.path.join(scratch, f"{name}-{steps}.log"))
        print(f"  {name}: {steps} steps in {runs[steps][0]:.1f} s, peak RSS {runs[steps][1]:,.0f} MiB", flush=True)
    return (runs[args.long][0] - runs[args.short][0]) / (args.long - args.short), runs[args.long][1]


def main(argv=None):
    args = parse_args(argv)
    with user_errors():
        if not args.ours_only:
            if importlib.util.find_spec("trl") is None:  # trl_dpo.py imports it, in its own process
                raise UserError("the TRL side needs trl: pip install trl (or pass --ours_only)")
        checkpoint, pairs = workload.build(args.workload)
        scratch = tempfile.mkdtemp(prefix="runs-", dir=args.workload)
        load_before = os.getloadavg()
        variants = [[]] + [[flag] for flag in ("--chunked_head", "--share_prompt") if getattr(args, flag[2:])]
        results = {}
        for extra in variants:
            name = " ".join(["nanoDPO dpo.py", *extra])
            tag = "ours" + "".join(extra).replace("--", "-")
            results[name] = per_step(lambda steps: ours_command(checkpoint, pairs, steps,
                                                                os.path.join(scratch, f"{tag}-{steps}"), extra),
                                     args, tag, scratch)
        if not args.ours_only:
            results["TRL DPOTrainer"] = per_step(lambda steps: trl_command(args.workload, steps), args, "trl", scratch)
        load_after = os.getloadavg()
        shutil.rmtree(scratch)

    print(f"\nload average (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in load_before)} before, "
          f"{' '.join(f'{x:.2f}' for x in load_after)} after; {os.cpu_count()} CPUs\n")
    trl = results.get("TRL DPOTrainer")
    print("| | seconds per DPO step | peak RSS |" + (" over TRL's: time | memory |" if trl else ""))
    print("|---|---|---|" + ("---|---|" if trl else ""))
    for name, (seconds, rss) in results.items():
        ratios = f" **{seconds / trl[0]:.3f}** | {rss / trl[1]:.3f} |" if trl else ""
        print(f"| {name} | {seconds:.3f} | {rss:,.0f} MiB |{ratios}")
    return results


if __name__ == "__main__":
    main()
