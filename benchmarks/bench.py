"""Throughput of one SFT step and one DPO step: median time, tokens/s, MFU and peak memory.

Random weights of a GPT-2 shape and random tokens, so nothing is downloaded. Every synthetic pair has a
prompt and two responses of --response_frac x --seq_len tokens each, so each of its two sequences (prompt +
response, as dpo_batch stacks them) is --seq_len tokens. A DPO batch holds --batch_size pairs: 2 x
batch_size stacked rows through the policy and the reference, or with --share_prompt batch_size packed
rows (data.packed_dpo_batch: prompt, chosen, rejected; the prompt once). tokens/s counts the pairs'
sequences as stacked, whichever the layout, so the two layouts compare directly.

MFU is the model FLOPs a step needs over the time it took and the device's peak. We count what the
maths requires: per token through the blocks 6 N (forward 2 N, backward 4 N; N the blocks' weights,
12 L C^2); per (query, key) pair that attention lets meet, 12 L C (forward: 2 C for q.k and 2 C for the
weighted v, in each of L layers); per labelled token 6 C V for the head. A causal row of T tokens has
T (T + 1) / 2 such pairs; a packed row has fewer tokens and fewer pairs (the prompt's queries are not
repeated, and a response does not see the other one), so its MFU counts only that work. The reference
costs the forward third (2 N, 4 L C, 2 C V). Not counted, because the model does not need them: the
recomputed head in backward of --chunked_head (machinery/fast.LabelLogProbs), the recomputed blocks of
--grad_checkpoint.

    python -m benchmarks.bench                          # gpt2 shapes, default device and dtype
    python -m benchmarks.bench --model gpt2-medium --dtype bfloat16 --compile
    python -m benchmarks.bench --share_prompt --only dpo  # the DPO step on packed rows
    python -m benchmarks.bench --n_layer 6 --n_head 6 --n_embd 384 --batch_size 4 --seq_len 256 --device cpu

The computed memory of a DPO step for every GPT-2 size is benchmarks/memory.py's.
"""
import argparse
import json
import math
import resource
import statistics
import time

import torch

import dpo
import sft
from data import collate, dpo_batch, inputs_and_labels
from machinery.cli import ArgumentParser, HelpFormatter, description, user_errors
from machinery.compute import init_compute
from machinery.fast import packed_dpo_batch, use_chunked_head
from model import GPT, GPT2_SIZES, IGNORE_INDEX, GPTConfig, param_groups
from rlhf import optimizer_steps

# dense peak TFLOP/s by GPU name and dtype (vendor datasheets; SXM parts); TF32 stands in for fp32
PEAK_TFLOPS = {"H100": {"bfloat16": 989, "float16": 989, "float32": 494},
               "H200": {"bfloat16": 989, "float16": 989, "float32": 494},
               "A100": {"bfloat16": 312, "float16": 312, "float32": 156}}


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m benchmarks.bench", description=description(__doc__), formatter_class=HelpFormatter)
    p.add_argument("--model", default="gpt2", choices=list(GPT2_SIZES), help="shape (weights are random)")
    p.add_argument("--n_layer", type=int, help="override the shape's layers (default: --model's)")
    p.add_argument("--n_head", type=int, help="override the shape's heads (default: --model's)")
    p.add_argument("--n_embd", type=int, help="override the shape's width (default: --model's)")
    p.add_argument("--batch_size", type=int, default=8, help="sequences for SFT, pairs for DPO")
    p.add_argument("--seq_len", type=int, default=512, help="tokens in every sequence (prompt + one response)")
    p.add_argument("--response_frac", type=float, default=0.5, help="the share of each sequence that is response")
    p.add_argument("--device", default="auto", help="auto (cuda if there is one, else cpu), cpu, cuda, ...")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPUs that have it, else fp16; fp32 on CPU), "
                   "float32, bfloat16, float16")
    p.add_argument("--compile", action="store_true", help="torch.compile the policy and the reference")
    p.add_argument("--precompute_ref", action="store_true", help="DPO without the reference in the step")
    p.add_argument("--share_prompt", action="store_true", help="DPO on packed rows, each prompt once")
    p.add_argument("--grad_checkpoint", action="store_true", help="recompute each block in backward")
    p.add_argument("--chunked_head", action="store_true", help="the output layer chunk by chunk (machinery/fast.py), "
                   "as the scripts' --chunked_head")
    p.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    p.add_argument("--only", choices=["sft", "dpo"], help="measure one of the two (default: both)")
    p.add_argument("--peak_tflops", type=float, help="the device's peak (default: a datasheet value for known "
                   "GPUs, a measured matmul on a CPU)")
    p.add_argument("--json", help="also write the results to this file (default: none)")
    args = p.parse_args(argv)
    if min(args.batch_size, args.seq_len, args.steps) < 1 or args.warmup < 0:
        p.error("--batch_size, --seq_len and --steps must be at least 1, --warmup not negative")
    if not 0 < args.response_frac < 1 or round(args.seq_len * args.response_frac) < 2:
        p.error(f"--response_frac {args.response_frac} must leave at least 2 response and 1 prompt tokens "
                f"of --seq_len {args.seq_len}")
    return args


def peak_tflops(device, dtype):
    """The device's peak: a datasheet number for known GPUs, a measured large matmul on a CPU."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        for key, peaks in PEAK_TFLOPS.items():
            if key in name:
                return peaks[dtype]
        print(f"notice: peak FLOP/s of {name} unknown, so no MFU; pass --peak_tflops for one")
        return math.nan
    a = torch.randn(2048, 2048, dtype=getattr(torch, dtype))
    a @ a
    t0 = time.perf_counter()
    for _ in range(10):
        a @ a
    return 10 * 2 * 2048 ** 3 / (time.perf_counter() - t0) / 1e12


# ----------------------------------------------------------------------------------------------------
# FLOPs: what the model must compute

def causal_pairs(queries, keys_before=0):
    """(query, key) pairs attention computes when `queries` tokens follow `keys_before` visible tokens,
    each new token seeing those and the new tokens up to itself."""
    return queries * keys_before + queries * (queries + 1) // 2


def counted_work(pairs, layout):
    """(tokens through the blocks, attended (query, key) pairs, labelled tokens through the head) of the
    tokenized pairs in one of three layouts: "sft" (prompt + chosen), "stacked" (dpo_batch) or "packed"
    (packed_dpo_batch). Padding is not counted: it is not work the model needs."""
    tokens = attended = labelled = 0
    for pair in pairs:
        p, c, r = len(pair["prompt"]), len(pair["chosen"]), len(pair["rejected"])
        if layout == "sft":  # inputs_and_labels(): prompt + response without its last token
            rows = [p + c - 1]
            labelled += c
        elif layout == "stacked":
            rows = [p + c - 1, p + r - 1]
            labelled += c + r
        else:  # prompt once, then each response (without its last token) seeing the prompt and itself
            tokens += p + c - 1 + r - 1
            attended += causal_pairs(p) + causal_pairs(c - 1, p) + causal_pairs(r - 1, p)
            labelled += c + r
            continue
        tokens += sum(rows)
        attended += sum(causal_pairs(row) for row in rows)
    return tokens, attended, labelled


def pass_flops(config, tokens, attended, labelled, train=True):
    """Model FLOPs of one pass (forward + backward if train, else forward)."""
    blocks = config.n_layer * 12 * config.n_embd ** 2  # attention 4 C^2 + MLP 8 C^2 per layer
    forward = (2 * blocks * tokens
               + 4 * config.n_layer * config.n_embd * attended
               + 2 * config.n_embd * config.vocab_size * labelled)
    return 3 * forward if train else forward


# ----------------------------------------------------------------------------------------------------
# The measured steps

def synthetic_pairs(n_pairs, seq_len, response_frac, vocab_size, seed=0):
    """Tokenized pairs of random ids, each sequence (prompt + response, less one: inputs_and_labels()) seq_len long."""
    generator = torch.Generator().manual_seed(seed)
    response = round(seq_len * response_frac)
    prompt = seq_len - response + 1

    def ids(n):
        return torch.randint(vocab_size, (n,), generator=generator).tolist()
    return [{"prompt": ids(prompt), "chosen": ids(response), "rejected": ids(response)} for _ in range(n_pairs)]


def reference_logps(reference, batch, cached):
    """As in dpo.micro_batch: the precomputed rows (--precompute_ref), or a forward pass without a graph."""
    if cached is not None:
        return cached.to(batch[0].device).unbind(1)
    with torch.no_grad():
        return dpo.pair_logps(reference, batch)


def measure(step, args, device):
    for _ in range(args.warmup):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)  # kernels run asynchronously: wait before reading the clock
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated(device) if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # CPU: the process's peak RSS
    return statistics.median(times), peak


def model_config(args):
    """The GPTConfig of --model with any --n_layer / --n_head / --n_embd override."""
    shape = dict(GPT2_SIZES[args.model])
    shape.update({k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd") if getattr(args, k)})
    return GPTConfig(block_size=max(1024, args.seq_len), **shape)  # packed rows are longer, their positions not


def run(args):
    """Measure, print the table, and return what was measured as a dict (written by --json)."""
    compute = init_compute(args)
    device, dtype = compute.device, compute.dtype
    config = model_config(args)
    shape = dict(n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd)
    ctx = compute.autocast
    peak = args.peak_tflops or peak_tflops(device, dtype)

    def new_model():
        torch.manual_seed(0)  # the same random weights each time: the reference starts equal to the policy
        with torch.device(device):  # initialized where it runs: a CPU init of gpt2-xl takes a while
            return GPT(config)

    policy = new_model()
    policy.grad_checkpoint = args.grad_checkpoint
    if args.chunked_head:
        use_chunked_head(policy)
    optimizer = torch.optim.AdamW(param_groups(policy, 0.0), lr=1e-6, betas=(0.9, 0.95), fused=device.startswith("cuda"))
    if args.compile:
        policy.compile()
    reference = None  # made after the SFT step is measured, so that its memory counts for DPO only
    scaler = compute.scaler

    def update(loss):  # the scripts' own step: backward, unscale, clip, step
        scaler.scale(loss).backward()
        optimizer_steps(scaler, [optimizer], [policy], 1.0)  # the end of dpo.py's step, as rlhf.py writes it

    pairs = synthetic_pairs(args.batch_size, args.seq_len, args.response_frac, config.vocab_size)
    sft_ids, sft_labels = (t.to(device) for t in collate([inputs_and_labels(p["prompt"], p["chosen"]) for p in pairs]))
    layout = "packed" if args.share_prompt else "stacked"
    dpo_rows = [t.to(device) for t in (packed_dpo_batch(pairs) if args.share_prompt else dpo_batch(pairs))]
    ref_logps = torch.zeros(args.batch_size, 2) if args.precompute_ref else None  # (pairs, chosen/rejected)

    def sft_step():
        with ctx:
            loss = sft.sft_loss(policy, sft_ids, sft_labels, (sft_labels != IGNORE_INDEX).sum())
        update(loss)

    def dpo_step():
        with ctx:
            chosen, rejected = dpo.pair_logps(policy, dpo_rows)
            ref_chosen, ref_rejected = reference_logps(reference, dpo_rows, ref_logps)
        update(dpo.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, 0.1)[0].mean())

    steps = []
    sequence_tokens = counted_work(pairs, "stacked")[0]  # both sequences of every pair, as stacked
    if args.only != "dpo":
        counts = counted_work(pairs, "sft")
        steps.append(("sft", counts, pass_flops(config, *counts), *measure(sft_step, args, device)))
    if args.only != "sft":
        counts = counted_work(pairs, layout)
        flops = pass_flops(config, *counts)
        if not args.precompute_ref:
            reference = dpo.freeze(new_model(), argparse.Namespace(device=device, dtype=dtype))
            if args.chunked_head:
                use_chunked_head(reference)
            if args.compile:
                reference.compile()
            flops += pass_flops(config, *counts, train=False)
        steps.append(("dpo", counts, flops, *measure(dpo_step, args, device)))

    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"cpu x{torch.get_num_threads()}"
    label = args.model if shape == GPT2_SIZES[args.model] else "custom"
    result = {"shape": label, **shape, "batch_size": args.batch_size, "seq_len": args.seq_len,
              "response_frac": args.response_frac, "dtype": dtype, "compile": args.compile,
              "precompute_ref": args.precompute_ref, "share_prompt": args.share_prompt,
              "grad_checkpoint": args.grad_checkpoint, "chunked_head": args.chunked_head, "device": name, "peak_tflops": peak, "steps": []}
    for kind, (tokens, attended, labelled), flops, seconds, memory in steps:
        pair_tokens = tokens if kind == "sft" else sequence_tokens
        result["steps"].append({"step": kind, "ms": seconds * 1000, "tokens_per_s": pair_tokens / seconds,
                                "model_tokens": tokens, "attended_pairs": attended, "labelled": labelled,
                                "flops": flops, "tflops": flops / seconds / 1e12,
                                "mfu": flops / seconds / 1e12 / peak, "peak_memory_mb": memory / 2**20})
    print(f"{label} shape ({config.n_layer} layers x {config.n_embd}), batch {args.batch_size}, seq_len "
          f"{args.seq_len}, response {args.response_frac:.0%}, {dtype}, compile {args.compile}, precompute_ref "
          f"{args.precompute_ref}, share_prompt {args.share_prompt}, grad_checkpoint {args.grad_checkpoint}, "
          f"chunked_head {args.chunked_head}; "
          f"{name}, peak {peak:.1f} TFLOP/s")
    print(f"{'step':5s} {'ms':>9s} {'tokens/s':>10s} {'TFLOP/s':>8s} {'MFU':>6s} {'peak mem':>9s}")
    for s in result["steps"]:
        print(f"{s['step']:5s} {s['ms']:9.1f} {s['tokens_per_s']:10.0f} {s['tflops']:8.2f} "
              f"{s['mfu']:6.1%} {s['peak_memory_mb']:7.0f}MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


def main(argv=None):
    args = parse_args(argv)
    with user_errors():
        run(args)


if __name__ == "__main__":
    main()
