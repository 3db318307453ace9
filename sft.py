"""Stage 1: supervised fine-tuning (SFT) on the preferred responses (--target), which makes the reference pi_ref.

DPO measures how far the policy moves from pi_ref, so pi_ref should already write replies like the data's (GPT-2
never saw "\\n\\nHuman: ... \\n\\nAssistant:" dialogues): SFT maximizes their likelihood, prompts untrained.

    python sft.py                      # gpt2 on Anthropic/hh-rlhf, one GPU
    python sft.py --demo               # the toy task, a tiny model from scratch, on a CPU
    python sft.py --target rejected    # a contrast: SFT that imitates the rejected responses
"""
import math
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from data import batch_indices, collate, sft_examples, tokenized_splits
from machinery import cli
from machinery.fast import use_chunked_head
from machinery.models import load_model
from machinery.run import Run
from model import IGNORE_INDEX, param_groups

# GPT-2 small on HH-RLHF on one GPU: 64 examples a step, about 0.6 epochs of HH's 161k training pairs
# (common practice, not tuned here).
DEFAULTS = dict(init="gpt2", data="Anthropic/hh-rlhf", batch_size=8, grad_accum=8, max_len=512, lr=2e-5,
                warmup=100, max_iters=1500, eval_interval=250, weight_decay=0.0, target="chosen")
# --demo: the toy task on a CPU, from scratch: a 2-layer, 4-head, 64-wide model (--n_layer, --n_head, --n_embd)
DEMO = dict(init="scratch", data="toy", batch_size=24, grad_accum=1, max_len=64, lr=3e-3, warmup=20,
            max_iters=500, eval_interval=100, eval_batches=4, device="cpu", weight_decay=0.1, target="both")
EXPERIMENT = ("target", "lr_decay_iters")  # sft.py's own flags that --resume must find unchanged


def parse_args(argv=None):
    parser = cli.training_parser(__doc__, DEFAULTS, DEMO)
    parser.add_argument("--target", choices=["chosen", "rejected", "both"], help="responses to imitate: chosen "
                        "(pi_ref for DPO), rejected (a contrast), or both (the demo: DPO then has a choice to make)")
    parser.add_argument("--lr_decay_iters", type=cli.at_least(0), help="the cosine decay ends here (default: "
                        "max_iters); set it to run part of a schedule now and --resume the rest later")
    args = cli.parse(parser, DEMO, argv, stage="sft")
    args.lr_decay_iters = args.lr_decay_iters or args.max_iters
    args.next = cli.next_command(parser, args, "dpo.py", [("--init", args.out_dir)])
    return args


def get_lr(step, args):
    """The learning rate at an optimizer step: warmup, then cosine decay to a tenth of the peak."""
    # 1) linear warmup over the first `warmup` steps
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    # 2) after lr_decay_iters, stay at the floor, a tenth of the peak
    min_lr = args.lr / 10
    if step >= args.lr_decay_iters:
        return min_lr
    # 3) in between, half a cosine from the peak down to the floor
    progress = (step - args.warmup) / max(1, args.lr_decay_iters - args.warmup)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (args.lr - min_lr)


def sft_loss(model, input_ids, labels, n_tokens):
    """This micro-batch's share of the step's loss: its response tokens' negative log-likelihood, summed,
    over n_tokens, the number of response tokens in the whole step (all its micro-batches)."""
    return -model(input_ids, labels).sum() / n_tokens


@torch.no_grad()
def evaluate(model, examples, args, compute):
    """Mean loss per response token on the first eval_batches micro-batches of the test split, and its
    perplexity, e^loss (under torchrun each process takes every world_size-th micro-batch)."""
    model.eval()
    total_logp, total_tokens = 0.0, 0
    starts = range(0, min(len(examples), args.eval_batches * args.batch_size), args.batch_size)
    for start in starts[compute.rank::compute.world_size]:
        input_ids, labels = (t.to(args.device) for t in collate(examples[start:start + args.batch_size]))
        with compute.autocast:
            total_logp += model(input_ids, labels).sum().item()
        total_tokens += (labels != IGNORE_INDEX).sum().item()
    total_logp, total_tokens = compute.all_reduce_sum([total_logp, total_tokens])
    model.train()
    loss = -total_logp / total_tokens
    return {"loss": loss, "ppl": math.exp(loss) if loss < 100 else float("inf")}


def train(args, run):
    compute = run.compute
    torch.manual_seed(args.seed)

    # data: every (prompt, response) of the target as one example; labels only on the response
    train_pairs, test_pairs = tokenized_splits(args.data, args.max_len, args.max_prompt_len, args.train_split,
                                               args.test_split)
    train_examples = sft_examples(train_pairs, args.target)
    test_examples = sft_examples(test_pairs, args.target)
    response_tokens = [len(labels) - labels.count(IGNORE_INDEX) for _, labels in train_examples]
    batch_indices(len(train_examples), args.batch_size, 0, args.seed)  # refuses a batch larger than the data now

    model = load_model(args.init, args)
    if args.chunked_head:  # opt-in: the same log-probs with less memory (docs/performance.md)
        model = use_chunked_head(model)
    model.grad_checkpoint = args.grad_checkpoint  # opt-in: recompute each block in backward, for less memory
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95),
                                  fused=args.device.startswith("cuda"))  # fused: one kernel, all weights
    run.depends_on(data={"training pairs": train_pairs, "held-out pairs": test_pairs})  # --resume: refuses others
    # the health check scores these held-out replies before every save (docs/runs.md)
    start = run.start_or_resume(model, optimizer, collate(test_examples[:args.batch_size]))  # 0, or --resume's step
    if args.compile:
        model.compile()  # in place: the state_dict keys stay those of the plain model
    ddp_model = DDP(model) if compute.world_size > 1 else model  # torchrun: DDP averages gradients across processes

    for step in range(start, args.max_iters):
        if args.eval_interval and step % args.eval_interval == 0:  # evaluate, check health, then save
            run.evaluate_and_save(step, lambda: evaluate(model, test_examples, args, compute))
        lr = get_lr(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.time()

        # Gradient accumulation: the loss is the mean over every response token of the step, so each micro-batch
        # divides its summed log-likelihood by that step-wide count, and k of them add up to exactly one batch k times
        # larger. (Each micro-batch's own mean, over k, would weigh a token of a short micro-batch more: exercise 5.)
        step_batches = [batch_indices(len(train_examples), args.batch_size, step * args.grad_accum + micro, args.seed)
                        for micro in range(args.grad_accum)]
        n_tokens = sum(response_tokens[i] for indices in step_batches for i in indices)
        mine = step_batches[compute.rank::compute.world_size]  # torchrun: this process's micro-batches (alone: all)
        loss_sum, n_seen = 0.0, 0
        for i, indices in enumerate(mine):
            input_ids, labels = (t.to(args.device) for t in collate([train_examples[j] for j in indices]))
            ddp_model.require_backward_grad_sync = i == len(mine) - 1  # torchrun: sync gradients on the last only
            with compute.autocast:  # mixed precision on a GPU (bf16 or fp16 matmuls); nothing on a CPU
                loss = sft_loss(ddp_model, input_ids, labels, n_tokens)
            # the scaler: fp16's loss scaling (else x 1); x world_size: DDP averages where the step adds up
            compute.scaler.scale(loss * compute.world_size).backward()
            loss_sum += loss.detach()  # stays on the device: no CPU-GPU sync per micro-batch
            n_seen += input_ids.numel()
        compute.scaler.unscale_(optimizer)  # fp16: the true gradients, to clip them
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
        compute.scaler.step(optimizer)  # fp16: skipped if a gradient overflowed
        compute.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        loss_sum, n_seen = compute.all_reduce_sum([float(loss_sum), n_seen])  # torchrun: summed over the processes
        dt = time.time() - t0  # after float(), which waits for the GPU: the whole step is timed
        run.log({"iter": step + 1, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm.item(), "dt_ms": dt * 1000,
                 "tokens_per_s": n_seen / dt})
        if run.stop_requested():  # Ctrl-C or SIGTERM: this step is done; save it and stop
            break
    run.finish(step + 1, lambda: evaluate(model, test_examples, args, compute))  # the last checkpoint; what next


def main(argv=None):
    args = parse_args(argv)
    with Run(args, "sft", EXPERIMENT) as run:  # refuses here, before any data or model is loaded
        train(args, run)


if __name__ == "__main__":
    main()
