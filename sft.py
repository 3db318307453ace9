"""Stage 1: supervised fine-tuning (SFT) on the preferred responses (--target), which makes the reference pi_ref.

DPO measures how far the policy moves from pi_ref on the preference data, so pi_ref should already write
replies like those in the data (GPT-2 never saw "\\n\\nHuman: ... \\n\\nAssistant:" dialogues). SFT maximizes
the likelihood of the target replies given their prompts; the prompt tokens are not trained on.

    python sft.py                      # gpt2 on Anthropic/hh-rlhf, one GPU
    python sft.py --demo               # the toy task, a tiny model from scratch, on a CPU
    python sft.py --target rejected    # a contrast: SFT that imitates the rejected responses
"""
import math
import time

import torch

from data import batch_indices, collate, sft_examples, tokenized_splits
from machinery import cli
from machinery.checkpoints import load_model
from machinery.compute import make_optimizer, optimizer_step, set_lr, wrap
from machinery.run import Run
from model import IGNORE_INDEX

# GPT-2 small on HH-RLHF on one GPU: 64 examples a step, about 0.6 epochs of HH's 161k training pairs
# (common practice, not tuned here).
DEFAULTS = dict(init="gpt2", data="Anthropic/hh-rlhf", batch_size=8, grad_accum=8, max_len=512, lr=2e-5,
                warmup=100, max_iters=1500, eval_interval=250, weight_decay=0.0, target="chosen")
# --demo: the toy task on a 2-layer, 64-wide model from scratch, on a CPU.
DEMO = dict(init="scratch", data="toy", batch_size=24, grad_accum=1, max_len=64, lr=3e-3, warmup=20,
            max_iters=300, eval_interval=100, eval_batches=4, device="cpu", weight_decay=0.1, target="both")
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

    model = load_model(args.init, args)
    optimizer = make_optimizer(model, args.lr, args.weight_decay, args.device)
    start = run.start(model, optimizer, lambda: evaluate(model, test_examples, args, compute),
                      held_out=collate(test_examples[:args.batch_size]), data=train_pairs, examples=len(train_examples))
    train_model = wrap(model, compute)  # torchrun: DDP averages the processes' gradients in backward

    for step in run.steps(start):  # range(start, max_iters); Ctrl-C and SIGTERM end it after a whole step
        if run.eval_due(step):  # every eval_interval steps: evaluate, then save if the model is healthy
            run.checkpoint(step)
        lr = get_lr(step, args)
        set_lr(optimizer, lr)
        t0 = time.time()

        # Gradient accumulation. The loss is the mean over every response token of the step, so each micro-batch
        # divides its summed log-likelihood by that step-wide count: k micro-batches then add up to exactly the
        # gradient of one batch k times larger, however response lengths differ. (Averaging each micro-batch's
        # own mean, then dividing by k, would weigh a token of a short micro-batch more than one of a long one.)
        micro_batches, loss_scale = compute.share(args.grad_accum)  # torchrun: this process's part of the step
        batches = [collate([train_examples[i] for i in batch_indices(len(train_examples), args.batch_size,
                                                                       step * args.grad_accum + micro, args.seed)])
                   for micro in micro_batches]
        n_tokens, n_seen = compute.all_reduce_sum([sum((labels != IGNORE_INDEX).sum().item() for _, labels in batches),
                                                   sum(input_ids.numel() for input_ids, _ in batches)])
        loss_sum = 0.0
        for i, (input_ids, labels) in enumerate(batches):
            compute.sync(train_model, last=i == len(batches) - 1)  # torchrun: average gradients once, at the end
            with compute.autocast:  # mixed precision on a GPU (bf16 or fp16 matmuls); nothing on a CPU
                loss = sft_loss(train_model, input_ids.to(args.device), labels.to(args.device), n_tokens)
            compute.scaler.scale(loss * loss_scale).backward()  # the scaler: fp16's loss scaling (else x 1)
            loss_sum += loss.detach()  # stays on the device: no CPU-GPU sync per micro-batch
        grad_norm = optimizer_step(model, optimizer, compute.scaler, args.grad_clip)  # unscale, clip, step
        dt = time.time() - t0
        run.log({"iter": step + 1, "loss": compute.all_reduce_sum(float(loss_sum)), "lr": lr,
                 "grad_norm": grad_norm.item(), "dt_ms": dt * 1000, "tokens_per_s": n_seen / dt})

    run.finish()  # the last checkpoint: evaluated, checked, then saved; and what to run next


def main(argv=None):
    args = parse_args(argv)
    with Run(args, "sft", EXPERIMENT) as run:  # refuses here, before any data or model is loaded
        train(args, run)


if __name__ == "__main__":
    main()
