"""Throughput of one SFT step and one DPO step: median time, tokens/s, MFU and peak memory.

Random weights of a GPT-2 shape and random tokens, so nothing is downloaded. Each sequence is
--seq_len tokens, the last --response_frac of them the response (the trained part); a DPO batch holds
--batch_size pairs, so 2 x batch_size sequences through the policy and the reference.

MFU is the model FLOPs a step needs over the time it took and the device's peak. We count what the
maths requires, with the head only on response tokens (the saving is ours to claim in time, not in
FLOPs): per sequence token 6 N (forward 2 N, backward 4 N, N the non-embedding weights) plus 6 L T C
for causal attention (half of the full T x T product); per response token 6 C V for the head; the
reference costs the forward third of that (2 N, 2 L T C, 2 C V). The recomputed head in backward
(model.LabelLogProbs) is not counted: it is our overhead, not the model's.

    python bench.py                                     # gpt2 shapes, default device and dtype
    python bench.py --model gpt2-medium --dtype bfloat16 --compile
    python bench.py --n_layer 6 --n_head 6 --n_embd 384 --batch_size 4 --seq_len 256 --device cpu
"""
import resource
import statistics
import time

import torch

import dpo
import sft
from model import GPT, GPT2_SIZES, IGNORE_INDEX, GPTConfig
from runs import ArgumentParser, HelpFormatter, UserError, compute_init, make_optimizer, user_errors

# dense peak TFLOP/s by GPU name and dtype (vendor datasheets; SXM parts); TF32 stands in for fp32
PEAK_TFLOPS = {"H100": {"bfloat16": 989, "float16": 989, "float32": 494},
               "H200": {"bfloat16": 989, "float16": 989, "float32": 494},
               "A100": {"bfloat16": 312, "float16": 312, "float32": 156}}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--model", default="gpt2", choices=list(GPT2_SIZES), help="shape (weights are random)")
    p.add_argument("--n_layer", type=int, help="override the shape's layers (default: --model's)")
    p.add_argument("--n_head", type=int, help="override the shape's heads (default: --model's)")
    p.add_argument("--n_embd", type=int, help="override the shape's width (default: --model's)")
    p.add_argument("--batch_size", type=int, default=8, help="sequences for SFT, pairs for DPO")
    p.add_argument("--seq_len", type=int, default=512, help="tokens in every sequence")
    p.add_argument("--response_frac", type=float, default=0.5, help="the share of each sequence that is response")
    p.add_argument("--device", default="auto", help="auto (cuda if there is one, else cpu), cpu, cuda, ...")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPUs that have it, else fp16; fp32 on CPU), "
                   "float32, bfloat16, float16")
    p.add_argument("--compile", action="store_true", help="torch.compile the policy and the reference")
    p.add_argument("--precompute_ref", action="store_true", help="DPO without the reference in the step")
    p.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    p.add_argument("--only", choices=["sft", "dpo"], help="measure one of the two (default: both)")
    p.add_argument("--peak_tflops", type=float, help="the device's peak (default: a datasheet value for known GPUs, a measured matmul on a CPU)")
    return p.parse_args(argv)


def peak_tflops(device, dtype):
    """The device's peak: a datasheet number for known GPUs, a measured large matmul on a CPU."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        for key, peaks in PEAK_TFLOPS.items():
            if key in name:
                return peaks[dtype]
        raise UserError(f"peak FLOP/s of {name} unknown; pass --peak_tflops")
    a = torch.randn(2048, 2048, dtype=getattr(torch, dtype))
    a @ a
    t0 = time.perf_counter()
    for _ in range(10):
        a @ a
    return 10 * 2 * 2048 ** 3 / (time.perf_counter() - t0) / 1e12


def step_flops(config, sequences, seq_len, response_tokens, train=True):
    """Model FLOPs of one pass over `sequences` rows (forward + backward if train, else forward)."""
    n = config.n_layer * 12 * config.n_embd ** 2  # non-embedding weights: attention 4 C^2 + MLP 8 C^2
    per_token = 2 * n + 2 * config.n_layer * seq_len * config.n_embd  # forward; attention causal half
    head = 2 * config.n_embd * config.vocab_size
    forward = sequences * seq_len * per_token + response_tokens * head
    return 3 * forward if train else forward


def synthetic_batch(n_sequences, args, config, device):
    torch.manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (n_sequences, args.seq_len), device=device)
    labels = torch.randint(0, config.vocab_size, (n_sequences, args.seq_len), device=device)
    labels[:, :int(args.seq_len * (1 - args.response_frac))] = IGNORE_INDEX  # the prompt part
    return input_ids, labels


def measure(step, args, device):
    for _ in range(args.warmup):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()  # kernels run asynchronously: wait before reading the clock
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # CPU: the process's peak RSS
    return statistics.median(times), peak


def run(args):
    compute = compute_init(args)
    device, dtype = compute.device, compute.dtype
    shape = dict(GPT2_SIZES[args.model])
    shape.update({k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd") if getattr(args, k)})
    config = GPTConfig(block_size=max(1024, args.seq_len), **shape)
    ctx = compute.autocast
    peak = args.peak_tflops or peak_tflops(device, dtype)
    policy = GPT(config).to(device)
    optimizer = make_optimizer(policy, 1e-6, 0.0, device)
    reference = None if args.precompute_ref else dpo.freeze(GPT(config).to(device), device, dtype)
    if args.compile:
        policy.compile()
        if reference is not None:
            reference.compile()
    scaler = compute.scaler

    def update(loss):
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    sft_ids, sft_labels = synthetic_batch(args.batch_size, args, config, device)
    dpo_ids, dpo_labels = synthetic_batch(2 * args.batch_size, args, config, device)
    ref_logps = None if reference is not None else torch.zeros(args.batch_size, 2)  # (pairs, chosen/rejected)

    def sft_step():
        with ctx:
            loss = sft.sft_loss(policy, sft_ids, sft_labels, (sft_labels != IGNORE_INDEX).sum())
        update(loss)

    def dpo_step():
        with ctx:
            chosen, rejected = dpo.pair_logps(policy, (dpo_ids, dpo_labels))
            ref_chosen, ref_rejected = dpo.reference_pair_logps(reference, (dpo_ids, dpo_labels), ref_logps)
        update(dpo.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, 0.1)[0].mean())

    results = []
    response = lambda labels: (labels != IGNORE_INDEX).sum().item()
    if args.only != "dpo":
        flops = step_flops(config, args.batch_size, args.seq_len, response(sft_labels))
        results.append(("sft", sft_ids.numel(), flops, *measure(sft_step, args, device)))
    if args.only != "sft":
        flops = step_flops(config, 2 * args.batch_size, args.seq_len, response(dpo_labels))
        if reference is not None:
            flops += step_flops(config, 2 * args.batch_size, args.seq_len, response(dpo_labels), train=False)
        results.append(("dpo", dpo_ids.numel(), flops, *measure(dpo_step, args, device)))

    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"cpu x{torch.get_num_threads()}"
    label = args.model if shape == GPT2_SIZES[args.model] else "custom"
    print(f"{label} shape ({config.n_layer} layers x {config.n_embd}), batch {args.batch_size}, seq_len "
          f"{args.seq_len}, response {args.response_frac:.0%}, {dtype}, compile {args.compile}, precompute_ref "
          f"{args.precompute_ref}; {name}, peak {peak:.1f} TFLOP/s")
    print(f"{'step':5s} {'ms':>9s} {'tokens/s':>10s} {'TFLOP/s':>8s} {'MFU':>6s} {'peak mem':>9s}")
    for kind, tokens, flops, seconds, memory in results:
        print(f"{kind:5s} {seconds * 1000:9.1f} {tokens / seconds:10.0f} {flops / seconds / 1e12:8.2f} "
              f"{flops / seconds / 1e12 / peak:6.1%} {memory / 2**20:7.0f}MB")
    return results


def main(argv=None):
    args = parse_args(argv)
    with user_errors():
        run(args)


if __name__ == "__main__":
    main()
