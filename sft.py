"""Stage 1: supervised fine-tuning (SFT) on the preferred responses, which makes the reference policy pi_ref.

DPO measures how far the policy moves from pi_ref on the preference data, so pi_ref should already
produce responses like those in the data: GPT-2 never saw "\\n\\nHuman: ... \\n\\nAssistant:" dialogues.
We maximize the likelihood of the chosen responses given their prompts (prompt tokens are not trained
on). How long to train it matters to DPO: too short, and the reference cannot yet write the responses
DPO is to choose between; run far past the point where the held-out loss flattens, and the same DPO run
moves the model much less (README, section 4, measures both on the toy task).

    python sft.py                      # gpt2 on Anthropic/hh-rlhf, one GPU
    python sft.py --demo               # toy task, tiny model from scratch, a minute on a CPU
    python sft.py --target rejected    # a contrast: SFT that imitates the rejected responses
"""
import math
import time

import torch

from data import batch_indices, collate, sft_examples, tokenized_splits
from model import IGNORE_INDEX, load_model
from runs import (UNIFORM_NLL, OutDir, RunLog, StopSignals, UserError, compute_init, distributed, eval_due,
                  make_optimizer, optimizer_step, parse_training_arguments, resume, scratch_shape,
                  training_arguments, user_errors)

# Defaults for GPT-2 small on HH-RLHF on one GPU: 64 examples a step, about 0.6 epochs of HH's 161k
# training pairs (common practice; not tuned here: no GPU has been lent to this project yet).
DEFAULTS = dict(init="gpt2", data="Anthropic/hh-rlhf", out_dir="out/sft", batch_size=8, grad_accum=8,
                max_len=512, lr=2e-5, warmup=100, max_iters=1500, eval_interval=250,
                weight_decay=0.0, target="chosen")
# --demo: the toy task on a 2-layer, 64-wide model from scratch; about a minute on 2 CPU cores.
DEMO = dict(init="scratch", data="toy", out_dir="out/demo/sft", batch_size=32, grad_accum=1, max_len=64,
            lr=3e-3, warmup=20, max_iters=300, eval_interval=100, device="cpu",
            weight_decay=0.1, target="both")


def parse_args(argv=None):
    parser = training_arguments(__doc__.splitlines()[0], DEFAULTS, DEMO)
    parser.add_argument("--target", choices=["chosen", "rejected", "both"],
                        help="responses to imitate: chosen (pi_ref for DPO), rejected (a contrast), or "
                        "both (the demo: an SFT model that shows both behaviours, so DPO has a choice to make)")
    parser.add_argument("--lr_decay_iters", type=int, help="the cosine decay ends here (default: max_iters); "
                        "set it to run part of a schedule now and --resume the rest later")
    args = parse_training_arguments(parser, DEMO, argv)
    if args.lr_decay_iters is not None and args.lr_decay_iters < 0:
        parser.error(f"--lr_decay_iters must not be negative, got {args.lr_decay_iters}")
    args.lr_decay_iters = args.lr_decay_iters or args.max_iters
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
    """This micro-batch's share of the effective batch's loss: its response tokens' negative
    log-likelihood, summed, over n_tokens, the number of response tokens in the whole effective batch."""
    return -model(input_ids, labels).sum() / n_tokens


@torch.no_grad()
def evaluate(model, examples, args, compute):
    """Mean loss per response token on the first eval_batches micro-batches of the test split (under
    torchrun each process takes every world_size-th micro-batch; the sums are added up)."""
    model.eval()
    total_logp, total_tokens = 0.0, 0
    starts = range(0, min(len(examples), args.eval_batches * args.batch_size), args.batch_size)
    for start in starts[compute.rank::compute.world_size]:
        input_ids, labels = (t.to(args.device) for t in collate(examples[start:start + args.batch_size]))
        with compute.autocast:
            total_logp += model(input_ids, labels).sum().item()
        total_tokens += (labels != IGNORE_INDEX).sum().item()
    total_logp, total_tokens = compute.sum([total_logp, total_tokens])
    model.train()
    return -total_logp / total_tokens


def train(args, compute, out):
    torch.manual_seed(args.seed)

    # data: every (prompt, response) of the target as one example; labels only on the response
    train_pairs, test_pairs = tokenized_splits(args.data, args.max_len, args.max_prompt_len, args.train_split,
                                               args.test_split)
    train_examples = sft_examples(train_pairs, args.target)
    test_examples = sft_examples(test_pairs, args.target)
    if args.batch_size > len(train_examples):
        raise UserError(f"--batch_size {args.batch_size} is larger than the {len(train_examples)} training examples")

    model = load_model(args.init, args.device, args.dropout, args.max_len, scratch_shape(args))
    model.grad_checkpoint = args.grad_checkpoint  # recompute each block in backward: memory for compute
    optimizer = make_optimizer(model, args.lr, args.weight_decay, args.device)
    start = resume(out, model, optimizer, compute.scaler) if args.resume else 0
    if args.compile:
        model.compile()  # in place: state_dict keys stay the same
    train_model = distributed(model, compute)  # torchrun: DDP averages the processes' gradients in backward
    log = RunLog(args.out_dir, start, write=compute.master)  # the first write: everything above can refuse

    first = train_examples[:1000]  # enough to estimate the mean
    mean_tokens = sum(label != IGNORE_INDEX for _, labels in first for label in labels) / len(first)
    processes = f" over {compute.world_size} processes" if compute.world_size > 1 else ""
    print(f"{model.num_params() / 1e6:.1f}M parameters, {args.device}, {args.dtype}; effective batch "
          f"{args.batch_size} x {args.grad_accum} = {args.batch_size * args.grad_accum} examples{processes}, "
          f"~{mean_tokens * args.batch_size * args.grad_accum:.0f} response tokens")

    def save(step):
        out.save(step, model, optimizer, compute.scaler)

    def log_eval(step):
        """Evaluate, log, and stop (saving nothing) if the held-out loss says the model is broken."""
        loss = evaluate(model, test_examples, args, compute)
        perplexity = math.exp(loss) if loss < 2 * UNIFORM_NLL else float("inf")  # no overflow on a broken model
        log({"iter": step, "split": "test", "loss": loss, "ppl": perplexity})
        out.check(step, loss, loss, "held-out")

    with StopSignals(compute) as stop:
        for step in range(start, args.max_iters):
            if eval_due(step, start, args.eval_interval):  # every eval_interval steps
                log_eval(step)  # stops the run, saving nothing, if the model is broken
                save(step)

            lr = get_lr(step, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.time()

            # Gradient accumulation. The loss is the mean over every response token of the *effective*
            # batch, so each micro-batch divides its summed log-likelihood by that batch-wide count:
            # k micro-batches then add up to exactly the gradient of one batch k times larger, however
            # the response lengths differ. (Averaging each micro-batch's own mean, then dividing by k,
            # weighs a token of a short micro-batch more than one of a long micro-batch.) Under torchrun
            # each process takes its own grad_accum / world_size of the step's micro-batches.
            per_process = args.grad_accum // compute.world_size
            micro_batches = []
            for micro in range(compute.rank * per_process, (compute.rank + 1) * per_process):
                indices = batch_indices(len(train_examples), args.batch_size, step * args.grad_accum + micro, args.seed)
                micro_batches.append(collate([train_examples[i] for i in indices]))
            n_tokens = sum((labels != IGNORE_INDEX).sum().item() for _, labels in micro_batches)
            n_tokens = int(compute.sum(n_tokens))  # the whole effective batch's, before any backward
            loss_sum, n_seen = 0.0, 0
            for i, (input_ids, labels) in enumerate(micro_batches):
                input_ids, labels = input_ids.to(args.device), labels.to(args.device)
                if compute.world_size > 1:  # torchrun: average gradients across processes once, at the end
                    train_model.require_backward_grad_sync = i == len(micro_batches) - 1
                with compute.autocast:
                    loss = sft_loss(train_model, input_ids, labels, n_tokens)
                # DDP divides the processes' summed gradients by their number; each loss is already a
                # share of the whole batch's, so it is scaled back up (x 1 without torchrun)
                compute.scaler.scale(loss * compute.world_size).backward()
                loss_sum += loss.detach()  # stays on the device: no CPU-GPU sync per micro-batch
                n_seen += input_ids.numel()
            loss_value, n_seen = compute.sum([float(loss_sum), n_seen])  # the step's one device-to-host copy
            out.check(step + 1, loss_value, loss_value, "training")  # step + 1: as log.jsonl numbers this step
            grad_norm = optimizer_step(model, optimizer, compute.scaler, args.grad_clip)  # unscale, clip, step

            dt = time.time() - t0
            log({"iter": step + 1, "split": "train", "loss": loss_value, "lr": lr,
                 "grad_norm": grad_norm.item(), "dt_ms": dt * 1000, "tokens_per_s": n_seen / dt})
            if stop.requested():  # Ctrl-C or SIGTERM: the step is done, save it and stop
                save(step + 1)
                return
        save(args.max_iters)  # the final checkpoint first, so that a crash or Ctrl-C in the final eval loses nothing
        log_eval(args.max_iters)
    flags = " --demo" if args.demo else f" --data {args.data}"
    print(f"next, DPO from this model: python dpo.py{flags} --init {args.out_dir}")


def main(argv=None):
    args = parse_args(argv)
    # OutDir refuses before any data or model is loaded
    with user_errors(), compute_init(args) as compute, OutDir(args, "sft", compute) as out:
        train(args, compute, out)


if __name__ == "__main__":
    main()
