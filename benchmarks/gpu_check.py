"""The GPU check: what needs a CUDA machine, in one command, offline, within a time budget.

    python -m benchmarks.gpu_check --out OUT_DIR         # on a CUDA machine: at most --budget_s seconds
    python -m benchmarks.gpu_check --out out/gpu-check --tiny --device cpu   # every stage at toy shapes

Jobs run in this order, most important first; a job starts only if its allowance (what it may take on
an H100, a first compilation included) still fits in --budget_s, else it is listed as skipped:

  tests     python -m pytest -m cuda tests: bf16 against fp32, fp16 + GradScaler, the bf16 reference,
            torch.compile, activation checkpointing and packed rows on the GPU's kernels
  eager     benchmarks/bench.py's SFT and DPO steps at gpt2 and gpt2-medium shapes, 8 pairs x 512 tokens with
            HH-RLHF's prompt share; the DPO step on stacked rows, then on packed rows (--share_prompt)
  memory    what autograd keeps in one forward, and the peak memory of the DPO step (8 x 512, bf16)
            for all four sizes in benchmarks/memory.py's four memory modes (its table's rows), against
            memory.memory_terms
  compile   the throughput jobs again with --compile, gpt2 first: last, because a first compilation
            is the slowest job (if gpt2-medium's are skipped: --skip tests,eager,memory --models gpt2-medium)
  torchrun  dpo.py under torchrun on 2 GPUs against 1 process (same optimizer steps), if there are 2 GPUs

After every job it rewrites OUT_DIR/summary.json (every number) and OUT_DIR/summary.md (the tables), so a
run cut short still leaves what it finished; every job's output goes to OUT_DIR/gpu_check.log: three
files in all. Random weights and synthetic tokens throughout, nothing is
downloaded (only the torchrun job reads text: the HH excerpt in examples/, with tiktoken's GPT-2 files).
"""
import contextlib
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree

import torch

from benchmarks import bench, memory
from data import dpo_batch, get_tokenizer
from machinery import UserError
from machinery.cli import ArgumentParser, HelpFormatter, description
from model import GPT, GPT2_SIZES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STAGES = ("tests", "eager", "memory", "compile", "torchrun")
# HH-RLHF harmless-base (the excerpt in examples/, at --max_len 512): prompts 113 tokens on average,
# responses 39 and 50, so a response is about 30% of its sequence. The prompt share decides what
# --share_prompt saves, so the throughput jobs use it; the memory jobs use the table's 50%.
HH_RESPONSE_FRAC = 0.3
# the memory modes (the rows of benchmarks/memory.py's table) as benchmarks/bench.py flags
MEMORY_MODES = {mode: ([] if reference else ["--precompute_ref"]) + (["--grad_checkpoint"] if checkpointing else [])
                for mode, reference, checkpointing in memory.MEMORY_MODES}
EXCERPT = os.path.join("examples", "hh-rlhf-harmless-base", "test.jsonl.gz")


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m benchmarks.gpu_check", description=description(__doc__), formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="folder for summary.json, summary.md and gpu_check.log")
    p.add_argument("--budget_s", type=float, default=450, help="seconds for all jobs; a job that would end "
                   "later is skipped")
    p.add_argument("--tiny", action="store_true", help="toy shapes and one step each: tries every stage on a CPU "
                   "in seconds (what tests/test_gpu_check.py runs)")
    p.add_argument("--device", default="cuda", help="cuda, cuda:1, ...; cpu only with --tiny")
    p.add_argument("--skip", help=f"comma-separated stages to leave out, of {', '.join(STAGES)} (default: none)")
    p.add_argument("--models", default="gpt2,gpt2-medium", help="comma-separated shapes of the eager and compile "
                   "jobs, e.g. gpt2-medium to run only the compile jobs a first run had no time for")
    args = p.parse_args(argv)
    args.skip = [stage for stage in (args.skip or "").split(",") if stage]
    unknown = [stage for stage in args.skip if stage not in STAGES]
    if unknown:
        p.error(f"--skip {','.join(unknown)}: the stages are {', '.join(STAGES)}")
    args.models = [model for model in args.models.split(",") if model]
    if not args.models or any(model not in GPT2_SIZES for model in args.models):
        p.error(f"--models {','.join(args.models)}: give some of {', '.join(GPT2_SIZES)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("no CUDA GPU here: run this on a GPU machine, or try the stages with --tiny --device cpu")
    if args.device == "cpu" and not args.tiny:
        p.error("--device cpu needs --tiny: the real shapes take hours on a CPU")
    return args


# ----------------------------------------------------------------------------------------------------
# The jobs: (stage, name, seconds it may need, what to run)

def bench_flags(args, model, share_prompt=False, compiled=False, extra=()):
    if args.tiny:
        shape = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--batch_size", "2", "--seq_len", "32",
                 "--steps", "1", "--warmup", "0", "--peak_tflops", "1"]
    else:
        shape = ["--batch_size", "8", "--seq_len", "512", "--steps", "10", "--warmup", "3"]
    flags = ["--model", model, "--device", args.device, *shape, *extra]
    if share_prompt:
        flags += ["--share_prompt", "--only", "dpo"]  # the SFT step does not change: measured once
    if compiled:
        flags += ["--compile"]
    return flags


def plan(args):
    """Every job, most important first. seconds: what a job may take on an H100, a first compilation
    included; a job is started only if that much of the budget is left."""
    jobs = [("tests", "pytest -m cuda", 200, run_cuda_tests)]
    throughput_sizes = args.models[:1] if args.tiny else args.models  # tiny: every code path, once
    memory_sizes = ("gpt2",) if args.tiny else ("gpt2-xl", "gpt2-large", "gpt2-medium", "gpt2")
    for model in throughput_sizes:
        jobs += throughput_jobs(args, model, compiled=False)
    jobs.append(("memory", "saved activations gpt2", 20, activation_job))
    for model in memory_sizes:
        for mode, extra in MEMORY_MODES.items():
            # one steady step, after the one that makes the optimizer's moments (a later flag wins in argparse)
            steady = [] if args.tiny else ["--steps", "1", "--warmup", "1"]
            flags = bench_flags(args, model, extra=["--only", "dpo", "--response_frac", "0.5", *extra, *steady])
            jobs.append(("memory", f"{model} {mode}", 30, memory_job(flags, model, mode)))
    for model in throughput_sizes:  # compiling takes the longest: last, so it cannot crowd out the rest
        jobs += throughput_jobs(args, model, compiled=True)
    jobs.append(("torchrun", "dpo.py on 1 and 2 GPUs", 120, run_torchrun))
    return [job for job in jobs if job[0] not in args.skip]


def throughput_jobs(args, model, compiled):
    """benchmarks/bench.py's SFT and DPO steps on stacked rows, then the DPO step on packed rows."""
    jobs = []
    for share_prompt in (False, True):
        flags = bench_flags(args, model, share_prompt, compiled, ["--response_frac", str(HH_RESPONSE_FRAC)])
        seconds = (150 if model == "gpt2" else 200) if compiled else 30
        name = f"{model} {'packed' if share_prompt else 'stacked'}{' compiled' if compiled else ''}"
        jobs.append(("compile" if compiled else "eager", name, seconds, bench_job(flags)))
    return jobs


def bench_job(flags):
    def run(args, log):
        return bench.run(bench.parse_args(flags))
    return run


def memory_job(flags, model, mode):
    def run(args, log):
        parsed = bench.parse_args(flags)
        result = bench.run(parsed)
        _, computed = memory.memory_terms(bench.model_config(parsed), parsed.batch_size, parsed.seq_len,
                                         parsed.response_frac, reference=not parsed.precompute_ref,
                                         grad_checkpoint=parsed.grad_checkpoint, chunked_head=parsed.chunked_head)
        measured = result["steps"][0]["peak_memory_mb"] * 2**20 if args.device.startswith("cuda") else None
        return {"model": model, "mode": mode, "measured_bytes": measured, "computed_bytes": computed,
                "ratio": measured / computed if measured else None, "bench": result}
    return run


def activation_job(args, log):
    """What autograd keeps in one bf16 forward of the policy on the GPU's own kernels (flash attention),
    against bench.activation_bytes + the bf16 weight copies: the activation term of the table, checked."""
    parsed = bench.parse_args(bench_flags(args, "gpt2", extra=["--response_frac", "0.5"]))
    config = bench.model_config(parsed)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = GPT(config)
    pairs = bench.synthetic_pairs(parsed.batch_size, parsed.seq_len, parsed.response_frac, config.vocab_size)
    batch = [t.to(args.device) for t in dpo_batch(pairs)]
    autocast = torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16)
    measured = memory.saved_activation_bytes(model, batch, autocast)
    labelled = bench.counted_work(pairs, "stacked")[2]
    computed = (memory.activation_bytes(config, 2 * parsed.batch_size, parsed.seq_len, labelled, 2)  # plain head
                + 2 * 12 * config.n_layer * config.n_embd ** 2)  # autocast's bf16 copies of the blocks' weights
    return {"measured_bytes": measured, "computed_bytes": computed, "ratio": measured / computed}


def run_cuda_tests(args, log):
    """The `cuda`-marked tests in a child pytest; counts and failures from its JUnit XML."""
    with tempfile.TemporaryDirectory() as scratch:
        report = os.path.join(scratch, "cuda-tests.xml")
        # a test module that cannot be imported here (a missing package) must not stop the cuda tests
        command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests", "-p", "no:cacheprovider",
                   "--continue-on-collection-errors", f"--junitxml={report}"]
        log.flush()  # the child writes straight to the log: a test that hangs still shows how far it got
        try:
            completed = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                       timeout=args.time_left)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"pytest ran past {args.time_left:.0f} s; gpu_check.log shows where") from None
        if not os.path.exists(report):
            raise RuntimeError(f"pytest exited {completed.returncode} without a report; see gpu_check.log")
        counts = junit_counts(report)
    if completed.returncode not in (0, 5) and not counts["failed"]:  # 5: nothing collected
        raise RuntimeError(f"pytest exited {completed.returncode}; see gpu_check.log")
    return counts


def junit_counts(path):
    """{"passed", "failed", "skipped", "failures": [(test, first line of the message)]} of a JUnit XML."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "failures": []}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name')}"
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        if problem is not None:
            counts["failed"] += 1
            counts["failures"].append((name, (problem.get("message") or "").partition("\n")[0][:300]))
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def run_torchrun(args, log):
    """The same dpo.py run as 1 process and as `torchrun --standalone --nproc_per_node 2`. --grad_accum counts
    the step's micro-batches in all (each of N processes does grad_accum / N), so both runs take the same
    optimizer steps: their losses should agree to bf16 noise, and 2 processes should give about twice
    the tokens/s."""
    if torch.cuda.device_count() < 2:
        raise Skip(f"needs 2 GPUs, this machine has {torch.cuda.device_count()}")
    try:
        get_tokenizer()
    except UserError as error:
        raise Skip(f"dpo.py needs tiktoken's GPT-2 files: {error}") from None
    common = ["dpo.py", "--init", "scratch", "--n_layer", "12", "--n_head", "12", "--n_embd", "768",
              "--data", EXCERPT, "--max_len", "512", "--batch_size", "8", "--grad_accum", "2", "--max_iters", "20",
              "--optimizer", "adamw", "--lr", "1e-4", "--warmup", "2", "--eval_interval", "0", "--eval_batches", "1"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # = torchrun
    result = {}
    scratch = tempfile.mkdtemp(prefix="gpu-check-torchrun-")  # checkpoints: not for OUT_DIR
    started = time.time()
    for name, launcher in (("1 process", [sys.executable]), ("torchrun 2 processes", torchrun)):
        out_dir = os.path.join(scratch, name.replace(" ", "-"))
        completed = subprocess.run(launcher + common + ["--out_dir", out_dir], cwd=ROOT, capture_output=True,
                                   text=True, timeout=max(10, args.time_left - (time.time() - started)))
        log.write(f"$ {' '.join(launcher + common)}\n{completed.stdout}{completed.stderr}\n")
        if completed.returncode != 0:
            raise RuntimeError(f"{name} exited {completed.returncode}: {completed.stderr.strip().splitlines()[-1:]}")
        with open(os.path.join(out_dir, "log.jsonl")) as f:
            train = [record for record in map(json.loads, f) if record["split"] == "train"][5:]  # past compile/warmup
        result[name] = {"tokens_per_s": sum(r["tokens_per_s"] for r in train) / len(train),
                        "dt_ms": sum(r["dt_ms"] for r in train) / len(train), "final_loss": train[-1]["loss"]}
    shutil.rmtree(scratch)
    return result


class Skip(Exception):
    """A job that cannot run on this machine (not a failure)."""


# ----------------------------------------------------------------------------------------------------
# Running them, and the summary

def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    open(os.path.join(args.out, "gpu_check.log"), "w").close()
    start = time.time()
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.processor() or "cpu"
    summary = {"device": device, "gpus": torch.cuda.device_count(), "torch": torch.__version__,
               "cuda": torch.version.cuda, "tiny": args.tiny, "budget_s": args.budget_s,
               "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "jobs": []}
    for stage, name, seconds, run in plan(args):
        elapsed = time.time() - start
        job = {"stage": stage, "name": name}
        if elapsed + (0 if args.tiny else seconds) > args.budget_s:
            job.update(status="skipped", reason=f"time budget: {elapsed:.0f} s used, the job may take {seconds} s")
        else:
            args.time_left = max(10, min(seconds, args.budget_s - elapsed))  # for the jobs that run a child
            job.update(run_job(args, stage, name, run))
        summary["jobs"].append(job)
        summary["seconds"] = time.time() - start
        write_summary(args.out, summary)
        print(f"{stage:8s} {name:40s} {job['status']:8s} {job.get('seconds', 0):6.1f}s {job.get('reason', '')}",
              flush=True)
    print(f"done in {time.time() - start:.0f} s: {os.path.join(args.out, 'summary.md')}")
    return summary


def run_job(args, stage, name, run):
    """Run one job, its output appended to gpu_check.log; a failure is recorded, not raised, and the next
    job runs."""
    t0 = time.time()
    with open(os.path.join(args.out, "gpu_check.log"), "a") as log, contextlib.redirect_stdout(log):
        print(f"\n===== {stage}: {name}", flush=True)
        try:
            outcome = {"status": "ok", "result": run(args, log)}
        except Skip as reason:
            outcome = {"status": "skipped", "reason": str(reason)}
        except Exception as error:  # an OOM or a bug in one job must not cost the others
            traceback.print_exc(file=log)
            outcome = {"status": "failed", "reason": f"{type(error).__name__}: {str(error).partition(chr(10))[0][:300]}"}
    outcome["seconds"] = time.time() - t0
    if stage == "compile":
        torch._dynamo.reset()  # the next job compiles a new model: old graphs only hold memory
    if torch.cuda.is_available():  # give back this job's GPU memory before the next one measures its own
        gc.collect()
        torch.cuda.empty_cache()
    return outcome


def write_summary(out, summary):
    summary["share_prompt"] = share_prompt_comparison(summary["jobs"])
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(markdown(summary))


def share_prompt_comparison(jobs):
    """For each shape and compile setting measured both ways: the DPO step's ms stacked and packed."""
    dpo_ms = {}
    for job in jobs:
        if job["stage"] in ("eager", "compile") and job["status"] == "ok":
            result = job["result"]
            dpo = next(step for step in result["steps"] if step["step"] == "dpo")
            model = job["name"].split()[0]  # the job's --model (with --tiny every shape reads "custom")
            dpo_ms[model, result["compile"], result["share_prompt"]] = dpo["ms"]
    rows = []
    for (shape, compiled, share_prompt), ms in dpo_ms.items():
        if not share_prompt and (shape, compiled, True) in dpo_ms:
            packed = dpo_ms[shape, compiled, True]
            rows.append({"shape": shape, "compile": compiled, "stacked_ms": ms, "packed_ms": packed,
                         "packed_over_stacked": packed / ms})
    return rows


def markdown(summary):
    jobs = summary["jobs"]
    lines = [f"# GPU check: {summary['device']}", "",
             f"torch {summary['torch']}, CUDA {summary['cuda']}, {summary['gpus']} GPU(s), started "
             f"{summary['started']}; {sum(j['status'] == 'ok' for j in jobs)} of {len(jobs)} jobs ran in "
             f"{summary['seconds']:.0f} s (budget {summary['budget_s']:.0f} s){'; TINY shapes' if summary['tiny'] else ''}.", ""]
    for job in jobs:
        if job["stage"] == "tests" and job["status"] == "ok":
            counts = job["result"]
            lines += [f"Tests (`pytest -m cuda`): {counts['passed']} passed, {counts['failed']} failed, "
                      f"{counts['skipped']} skipped.", ""]
            lines += [f"- FAILED {test}: {message}" for test, message in counts["failures"]]
    steps = [job for job in jobs if job["stage"] in ("eager", "compile") and job["status"] == "ok"]
    if steps:
        lines += ["## Steps", "", "| shape | compile | DPO rows | step | ms | tokens/s | TFLOP/s | MFU | peak MiB |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|"]
        for job in steps:
            r = job["result"]
            for s in r["steps"]:
                lines.append(f"| {job['name'].split()[0]} | {'yes' if r['compile'] else 'no'} | "
                             f"{'packed' if r['share_prompt'] else 'stacked'} | {s['step']} | {s['ms']:.1f} | "
                             f"{s['tokens_per_s']:,.0f} | {s['tflops']:.1f} | {s['mfu']:.1%} | {s['peak_memory_mb']:,.0f} |")
        best = max((s["mfu"], job["name"]) for job in steps for s in job["result"]["steps"] if s["step"] == "dpo")
        lines += ["", f"Batch {r['batch_size']} x {r['seq_len']} tokens, {r['response_frac']:.0%} response, {r['dtype']}; "
                  "tokens/s counts each pair's two sequences in both layouts. "
                  f"Best DPO step: {best[0]:.1%} MFU ({best[1]}).", ""]
    if summary["share_prompt"]:
        lines += ["## --share_prompt against stacked rows (DPO step)", "",
                  "| shape | compile | stacked ms | packed ms | packed / stacked |", "|---|---|---:|---:|---:|"]
        for row in summary["share_prompt"]:
            lines.append(f"| {row['shape']} | {'yes' if row['compile'] else 'no'} | {row['stacked_ms']:.1f} | "
                         f"{row['packed_ms']:.1f} | {row['packed_over_stacked']:.3f} |")
        wins = sum(row["packed_over_stacked"] < 1 for row in summary["share_prompt"])
        lines += ["", f"Packed rows were faster in {wins} of {len(summary['share_prompt'])} comparisons.", ""]
    memory = [job for job in jobs if job["stage"] == "memory" and job["status"] == "ok"]
    if memory:
        lines += ["## Memory: measured against computed", "", "| job | measured GiB | computed GiB | measured / computed |",
                  "|---|---:|---:|---:|"]
        for job in memory:
            r = job["result"]
            measured = f"{r['measured_bytes'] / 2**30:.2f}" if r["measured_bytes"] else "n/a (CPU)"
            ratio = f"{r['ratio']:.3f}" if r["ratio"] else "n/a"
            lines.append(f"| {job['name']} | {measured} | {r['computed_bytes'] / 2**30:.2f} | {ratio} |")
        lines += ["", "Peak = torch.cuda.max_memory_allocated over one steady DPO step (8 pairs x 512, 50% response, "
                  "bf16); computed = bench.memory_terms. 'saved activations': autograd's saved tensors in one forward.", ""]
    if any(job["stage"] == "torchrun" and job["status"] == "ok" for job in jobs):
        lines += ["## torchrun", ""]
        for job in jobs:
            if job["stage"] == "torchrun" and job["status"] == "ok":
                for name, r in job["result"].items():
                    lines.append(f"- {name}: {r['tokens_per_s']:,.0f} tokens/s, {r['dt_ms']:.0f} ms/step, "
                                 f"final loss {r['final_loss']:.4f}")
        lines.append("")
    not_run = [job for job in jobs if job["status"] != "ok"]
    if not_run:
        lines += ["## Not run or failed", ""]
        lines += [f"- {job['stage']} / {job['name']}: {job['status']}: {job['reason']}" for job in not_run]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
