"""benchmarks.memory.memory_terms against a measured peak, on a CPU (Linux): the check behind the memory table.

A GPU reports its peak (torch.cuda.max_memory_allocated; benchmarks/gpu_check.py compares it there); a
CPU does not, but Linux keeps the process's peak resident memory (VmHWM) and resets it on request. So each
configuration runs in a fresh process that takes two DPO steps (the optimizer's moments then exist), resets
the peak to the current resident memory, takes a third step, and reads how far above rest the peak went.
That is compared with memory_terms' peak minus its resting part (weights, moments, reference), computed
for the same shapes. glibc is told to map every allocation of 64 kB or more on its own
(MALLOC_MMAP_THRESHOLD_), so freed tensors leave the resident set at once instead of staying cached.

    python -m benchmarks.memory_check      # 8 configurations of a 6 x 384 model; ~20 min on 2 cores (bf16 is slow there)

bf16 runs under CPU autocast, which casts as CUDA's does (matmul inputs bf16, LayerNorm fp32), with the
reference cast to bf16 as dpo.freeze does on a GPU; the last two rows use --chunked_head (LabelLogProbs, in
the CPU's 32 MB chunks) instead of model.py's plain output layer.
"""
import argparse
import contextlib
import copy
import os
import subprocess
import sys

import torch

import dpo
from benchmarks import bench, memory
from data import dpo_batch
from machinery.cli import ArgumentParser
from machinery.fast import LabelLogProbs, use_chunked_head
from model import GPT, GPTConfig
from rlhf import optimizer_steps

SHAPE = dict(n_layer=6, n_head=6, n_embd=384)
PAIRS, SEQ_LEN = 2, 256
# (precision, grad_checkpoint, fused AdamW, reference live, --chunked_head)
CONFIGURATIONS = [("float32", False, False, True, False), ("float32", True, False, True, False),
                  ("float32", True, True, True, False), ("bfloat16", False, True, True, False),
                  ("bfloat16", True, True, True, False), ("bfloat16", False, True, False, False),
                  ("float32", False, False, True, True), ("bfloat16", False, True, True, True)]


def resident(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def measure(precision, grad_checkpoint, fused, reference_live, chunked_head):
    """The peak above rest of one steady DPO step, in this process (bytes)."""
    torch.manual_seed(0)
    config = GPTConfig(**SHAPE)
    policy = GPT(config)
    policy.grad_checkpoint = grad_checkpoint
    if chunked_head:
        use_chunked_head(policy)  # before the copy: the reference gets its own chunked head
    # as dpo.freeze does on a GPU (it casts only there): this CPU stands in for one
    reference = copy.deepcopy(policy).eval().requires_grad_(False).to(getattr(torch, precision))
    cached = None
    if not reference_live:
        reference = None
        cached = torch.zeros(PAIRS, 2)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6, fused=fused)
    no_scaling = torch.amp.GradScaler("cpu", enabled=False)  # fp32 and bf16 need no loss scaling
    batch = dpo_batch(bench.synthetic_pairs(PAIRS, SEQ_LEN, 0.5, config.vocab_size))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bfloat16" else contextlib.nullcontext()

    def step():
        with autocast:
            chosen, rejected = dpo.pair_logps(policy, batch)
            ref_chosen, ref_rejected = bench.reference_logps(reference, batch, cached)
        dpo.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, 0.1)[0].mean().backward()
        optimizer_steps(no_scaling, [optimizer], [policy], 1.0)  # the scripts' clip and step, as rlhf.py writes them

    step()
    step()
    rest = resident("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)
    step()
    return resident("VmHWM") - rest


def computed(precision, grad_checkpoint, fused, reference_live, chunked_head):
    terms, peak = memory.memory_terms(GPTConfig(**SHAPE), PAIRS, SEQ_LEN, 0.5, reference_live, grad_checkpoint,
                                     matmul_bytes=2 if precision == "bfloat16" else 4, fused_optimizer=fused,
                                     chunked_head=chunked_head, chunk_budget=LabelLogProbs.BUDGET["cpu"])
    return peak - terms["weights and AdamW moments"] - terms["reference"]


def main(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child: measure configuration ONE, print bytes
    args = p.parse_args(argv)
    if args.one is not None:
        torch.set_num_threads(2)
        print(measure(*CONFIGURATIONS[args.one]))
        return
    if not os.path.exists("/proc/self/clear_refs"):
        sys.exit("error: this check reads Linux's /proc/self/status and resets its peak; run it on Linux")
    print(f"DPO step, {SHAPE['n_layer']} layers x {SHAPE['n_embd']}, {PAIRS} pairs x {SEQ_LEN} tokens, CPU")
    print("| precision | --grad_checkpoint | fused AdamW | reference | head | measured MiB | computed MiB | "
          "measured / computed |")
    print("|---|---|---|---|---|---:|---:|---:|")
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for number, configuration in enumerate(CONFIGURATIONS):
        child = subprocess.run([sys.executable, "-m", "benchmarks.memory_check", "--one", str(number)], env=environment,
                               capture_output=True, text=True, check=True)
        measured = int(child.stdout.split()[-1])
        expected = computed(*configuration)
        precision, grad_checkpoint, fused, reference_live, chunked_head = configuration
        print(f"| {precision} | {'yes' if grad_checkpoint else 'no'} | {'yes' if fused else 'no'} | "
              f"{'live' if reference_live else 'precomputed'} | {'chunked' if chunked_head else 'plain'} | "
              f"{measured / 2**20:.1f} | {expected / 2**20:.1f} | {measured / expected:.3f} |", flush=True)


if __name__ == "__main__":
    main()
