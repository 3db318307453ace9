"""Stage 2: Direct Preference Optimization (Rafailov et al., 2023) against a frozen reference.

RLHF fits a reward model r(x, y) to preference pairs, then maximizes r with PPO under a KL penalty
beta * KL(pi || pi_ref). That KL-constrained problem has a closed-form optimum,

    pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x),                                       (eq. 4)

so every policy defines the reward it is optimal for: r(x, y) = beta log(pi(y|x) / pi_ref(y|x))
+ beta log Z(x) (eq. 5). Put that reward into the Bradley-Terry preference model and Z(x) cancels,
because both responses share the prompt x. What is left is a classification loss on the policy itself:

    L_DPO = -log sigmoid(beta log(pi(y_w|x) / pi_ref(y_w|x)) - beta log(pi(y_l|x) / pi_ref(y_l|x)))   (eq. 7)

No reward model, no sampling, no RL: two forward passes (policy and reference) per pair.

    python dpo.py --beta 0.1                      # from out/sft, on Anthropic/hh-rlhf, one GPU
    python dpo.py --demo --beta 0.1               # the toy task on a CPU, from out/demo/sft
    python dpo.py --demo --beta 0.1 --swap        # the "bad" model: rejected responses as preferred
"""
import copy
import os
import time

import torch
import torch.nn.functional as F

from data import batch_indices, dpo_batch, packed_dpo_batch, tokenized_splits
from model import GPT2_SIZES, load_model
from runs import (OutDir, RunLog, StopSignals, UserError, compute_init, distributed, eval_due, load_checkpoint,
                  make_optimizer, optimizer_step, parse_training_arguments, resume, scratch_shape,
                  training_arguments, user_errors)

# The paper's settings (sec. 6 and app. B): beta 0.1, batch 64, RMSprop at lr 1e-6 with 150 warmup steps;
# one epoch of HH's 160k pairs is 2,500 steps of 64.
DEFAULTS = dict(init="out/sft", data="Anthropic/hh-rlhf", out_dir=None, batch_size=8, grad_accum=8,
                max_len=512, lr=1e-6, warmup=150, max_iters=2500, eval_interval=250,
                optimizer="rmsprop", beta=0.1)
# --demo: the toy task from the demo SFT model; a minute or two on 2 CPU cores.
DEMO = dict(init="out/demo/sft", data="toy", batch_size=16, grad_accum=1, max_len=64,
            lr=2e-5, warmup=10, max_iters=80, eval_interval=20, device="cpu", optimizer="adamw")


def parse_args(argv=None):
    parser = training_arguments(__doc__.splitlines()[0], DEFAULTS, DEMO,
                                out_dir_default="out/dpo, or out/dpo-bad with --swap; out/demo/dpo(-bad) with --demo")
    parser.add_argument("--beta", type=float, help="strength of the KL constraint: small beta lets the policy "
                        "move far from the reference")
    parser.add_argument("--loss_type", default="sigmoid", choices=["sigmoid", "ipo"],
                        help="sigmoid: DPO's eq. 7; ipo: the squared loss of IPO (Azar et al., 2023)")
    parser.add_argument("--label_smoothing", type=float, default=0.0,
                        help="conservative DPO: the probability that a preference label is flipped")
    parser.add_argument("--ref", help="the frozen reference (default: --init)")
    parser.add_argument("--optimizer", choices=["rmsprop", "adamw"], help="rmsprop, as in the paper, or adamw")
    parser.add_argument("--precompute_ref", action="store_true",
                        help="compute the reference log-probs once before training; keeps one model in memory")
    parser.add_argument("--share_prompt", action="store_true", help="run each pair as one row, its prompt "
                        "once (data.packed_dpo_batch): same log-probs, fewer tokens")
    parser.add_argument("--swap", action="store_true", help="train on rejected responses as if preferred "
                        "(the \"bad\" model); evaluation still uses the true preferences")
    args = parse_training_arguments(parser, DEMO, argv)
    if not args.beta > 0:
        parser.error(f"--beta must be positive, got {args.beta}")
    if not 0 <= args.label_smoothing < 0.5:
        parser.error(f"--label_smoothing must be in [0, 0.5), got {args.label_smoothing}")
    if args.label_smoothing and args.loss_type == "ipo":
        parser.error("--label_smoothing applies to the sigmoid loss only, not to --loss_type ipo")
    if args.out_dir is None:
        stem = "out/demo/dpo" if args.demo else "out/dpo"
        args.out_dir = stem + ("-bad" if args.swap else "")
    ref_given = args.ref is not None
    args.ref = args.ref or args.init
    try:
        require_models(args, ref_given)
    except UserError as e:
        parser.error(str(e))
    return args


# ----------------------------------------------------------------------------------------------------
# The objective

def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta, loss_type="sigmoid", label_smoothing=0.0):
    """Per-pair losses and implicit rewards from summed response log-probs, each of shape (B,)."""
    # h: how much more the policy prefers y_w over y_l than the reference does, in log space
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        # eq. 7. With label_smoothing eps > 0 this is conservative DPO (cDPO; Mitchell, 2023, "A note on
        # DPO with noisy preferences & relationship to IPO", eq. 3), for data where some labels are wrong:
        # each label counts as flipped with probability eps. The loss is not bounded (it still grows
        # linearly in |h|), but its minimum is at a finite beta h = ln((1 - eps) / eps) instead of at
        # h = infinity, so a pair stops pulling once its margin gets there.
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        # IPO (Azar et al., 2023, arXiv:2310.12036, eq. 17 of its v2): when a preference is deterministic
        # in the data, DPO's optimum pushes h to infinity whatever beta, and the KL term stops holding
        # the policy back (their sec. 4). IPO regresses h to 1 / (2 tau), tau = beta, instead. h uses
        # summed log-probs here, as the DPO authors' code does; TRL averages them per token, so the same
        # beta gives other numbers there.
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    # the implicit reward beta log(pi / pi_ref) of sec. 4: eq. 5 without beta log Z(x), which cancels in a pair
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def reward_accuracy(chosen_rewards, rejected_rewards):
    """Share of pairs ranked right; a tie counts as half, so a policy equal to its reference reads 0.5."""
    return ((chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()).mean()


def pair_logps(model, batch):
    """log pi(y_w|x) and log pi(y_l|x) of each pair, from ONE forward pass over the batch.

    The batch is dpo_batch's 2B rows (chosen rows first) or packed_dpo_batch's B rows (labels (2, B, W):
    chosen plane first). log pi(y|x) is the *sum* of the response tokens' log-probs, in fp32: the
    paper's quantity. Averaging over tokens instead (as some libraries do) replaces each log pi(y|x) by
    a per-token mean: h is then no longer a log-ratio of sequence probabilities, so the loss is no longer
    eq. 7 of the KL-constrained problem, and as a mean is about |y| times smaller than a sum, a given
    beta then acts like one about |y| times smaller.
    """
    logps = model(*batch).sum(dim=-1).view(2, -1)  # (2, B): the forward with labels gives log-probs
    return logps[0], logps[1]


# ----------------------------------------------------------------------------------------------------
# The loop

def require_models(args, ref_given):
    """Fail in one line, before anything is loaded or written, if --init or --ref names nothing, if the
    run would write over them, or if the reference would silently be a DPO policy."""
    for name in {args.init, args.ref}:
        if name not in GPT2_SIZES and name != "scratch" and not os.path.exists(name):
            raise UserError(f"no model at {name}: run `python sft.py{' --demo' if args.demo else ''}` first, "
                            "or pass --init gpt2 (and --ref) to start from the pretrained model")
        if os.path.exists(name) and os.path.realpath(name) == os.path.realpath(args.out_dir):
            raise UserError(f"--out_dir {args.out_dir} is also the model DPO starts from or compares with; "
                            "writing there would replace it: give another --out_dir")
    init_checkpoint = os.path.join(args.init, "ckpt.pt")
    if not ref_given and os.path.isfile(init_checkpoint) and load_checkpoint(init_checkpoint).get("stage") == "dpo":
        # a DPO policy is no reference: the run that made it compared it with its own SFT model
        raise UserError(f"--init {args.init} is a DPO run, so --ref would default to that DPO policy rather "
                        "than the SFT model it was trained against: pass --ref explicitly (e.g. that SFT model)")


def load_models(args):
    """The policy to train and its frozen reference."""
    policy = load_model(args.init, args.device, args.dropout, args.max_len, scratch_shape(args))
    # the usual case, ref = init: a copy, not a second load (and for --init scratch, the same random model)
    if args.ref == args.init:
        reference = copy.deepcopy(policy)
    else:
        reference = load_model(args.ref, args.device, args.dropout, args.max_len, scratch_shape(args))
    a, b = policy.config, reference.config
    if (a.n_layer, a.n_head, a.n_embd, a.vocab_size) != (b.n_layer, b.n_head, b.n_embd, b.vocab_size):
        raise UserError(f"--init {args.init} ({a.n_layer} layers x {a.n_embd}) and --ref {args.ref} "
                        f"({b.n_layer} layers x {b.n_embd}) differ in shape; DPO starts the policy at the reference")
    return policy, freeze(reference, args.device, args.dtype)


def freeze(reference, device, dtype):
    """No gradients, no dropout. On a GPU its weights are cast to the training dtype (bf16 or fp16):
    it is never updated, so it needs no fp32 master copy, and that halves its memory and traffic. The
    price: its log-probs differ from the fp32 policy's by rounding, so at step 0 on a GPU the rewards
    are close to 0 rather than exactly 0."""
    reference.eval().requires_grad_(False)
    if device.startswith("cuda") and dtype != "float32":
        reference.to(getattr(torch, dtype))
    return reference


def make_batch(pairs, indices, args):
    """The micro-batch of pairs[indices] on the device: stacked 2B rows, or packed rows with --share_prompt."""
    selected = [pairs[i] for i in indices]
    if args.share_prompt:
        batch = packed_dpo_batch(selected)
    else:
        batch = dpo_batch(selected)
    return [t.to(args.device) for t in batch]


def reference_pair_logps(reference, batch, cached):
    """The reference's (chosen, rejected) log-probs: the rows precomputed for these pairs (--precompute_ref),
    or one forward pass without a graph: pi_ref is a constant, so no activations are kept for it."""
    if cached is not None:
        return cached.to(batch[0].device).unbind(1)
    with torch.no_grad():
        return pair_logps(reference, batch)


@torch.no_grad()
def precompute_reference(reference, pairs, args, compute):
    """(N, 2) reference log-probs of every pair (chosen, rejected), in micro-batches. Under torchrun each
    process fills every world_size-th micro-batch's rows and the processes add up their tables."""
    logps = torch.zeros(len(pairs), 2, device=args.device)
    starts = range(0, len(pairs), args.batch_size)
    for start in starts[compute.rank::compute.world_size]:
        end = min(start + args.batch_size, len(pairs))
        batch = make_batch(pairs, range(start, end), args)
        with compute.autocast:
            logps[start:end] = torch.stack(pair_logps(reference, batch), dim=1).float()
    return compute.sum(logps).cpu()


# What dpo.py logs, under the names the authors' code uses (accuracy and margin singular here)
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen",
           "logps/rejected")


def metric_sums(losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected):
    """This micro-batch's sums over pairs, by name. They stay on the device: reading each with .item()
    would make the CPU wait for the GPU."""
    return {"loss": losses.detach().sum(),
            "rewards/chosen": chosen_rewards.sum(),
            "rewards/rejected": rejected_rewards.sum(),
            "rewards/margin": (chosen_rewards - rejected_rewards).sum(),
            "rewards/accuracy": reward_accuracy(chosen_rewards, rejected_rewards) * len(losses),
            "logps/chosen": policy_chosen.detach().sum(),
            "logps/rejected": policy_rejected.detach().sum()}


def add_sums(total, sums):
    return sums if total is None else {name: total[name] + value for name, value in sums.items()}


def means(total, n_pairs, compute):
    """The sums (added up over the processes under torchrun) as means over n_pairs, with one
    device-to-host copy for all of them."""
    values = compute.sum(torch.stack([total[name].float() for name in METRICS])).tolist()
    return {name: value / n_pairs for name, value in zip(METRICS, values)}


@torch.no_grad()
def evaluate(policy, reference, pairs, ref_cache, args, compute):
    """DPO metrics on the first eval_batches micro-batches of the held-out split (true preferences).
    Under torchrun each process takes every world_size-th micro-batch; the sums are added up."""
    policy.eval()
    n = min(len(pairs), args.eval_batches * args.batch_size)
    total = {name: torch.zeros((), device=args.device) for name in METRICS}  # a process may get no batch
    for start in range(0, n, args.batch_size)[compute.rank::compute.world_size]:
        indices = list(range(start, min(start + args.batch_size, n)))
        batch = make_batch(pairs, indices, args)
        with compute.autocast:
            policy_chosen, policy_rejected = pair_logps(policy, batch)
            ref_chosen, ref_rejected = reference_pair_logps(
                reference, batch, None if ref_cache is None else ref_cache[indices])
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, args.beta, args.loss_type, args.label_smoothing)
        total = add_sums(total, metric_sums(losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected))
    policy.train()
    return means(total, n, compute)


# The divergence watchdog: a warning when the policy gives the held-out chosen responses this many nats
# less (per pair, on average) than the reference does. DPO only asks the chosen-minus-rejected margin to
# grow, and lowering both log-probs is a cheap way to grow it; a little is normal (README, "Healthy
# curves"), but 5 nats means e^5 = 148 times less likely: the mass is going to text in neither response.
WATCHDOG_NATS = 5.0


def train(args, compute, out):
    torch.manual_seed(args.seed)

    train_pairs, test_pairs = tokenized_splits(args.data, args.max_len, args.max_prompt_len, args.train_split,
                                               args.test_split)
    if args.swap:  # the "bad" model: learn to prefer what the annotators rejected
        train_pairs = [{"prompt": p["prompt"], "chosen": p["rejected"], "rejected": p["chosen"]} for p in train_pairs]
    if args.batch_size > len(train_pairs):
        raise UserError(f"--batch_size {args.batch_size} is larger than the {len(train_pairs)} training pairs")

    policy, reference = load_models(args)
    train_ref = test_ref = None
    if args.precompute_ref:
        # one pass of the reference over the data now, then only the policy stays in memory
        t0 = time.time()
        train_ref = precompute_reference(reference, train_pairs, args, compute)
        test_ref = precompute_reference(reference, test_pairs, args, compute)
        reference = None
        print(f"reference log-probs of {len(train_pairs) + len(test_pairs)} pairs in {time.time() - t0:.1f}s")

    policy.grad_checkpoint = args.grad_checkpoint  # recompute each block in backward: memory for compute
    optimizer = make_optimizer(policy, args.lr, args.weight_decay, args.device, kind=args.optimizer)
    start = resume(out, policy, optimizer, compute.scaler) if args.resume else 0
    if args.compile:
        policy.compile()
        if reference is not None:
            reference.compile()
    train_policy = distributed(policy, compute)  # torchrun: DDP averages the processes' gradients in backward
    log = RunLog(args.out_dir, start, write=compute.master)  # the first write: everything above can refuse
    pairs_per_step = args.batch_size * args.grad_accum
    processes = f" over {compute.world_size} processes" if compute.world_size > 1 else ""
    print(f"{policy.num_params() / 1e6:.1f}M parameters, {args.device}, {args.dtype}; beta {args.beta}, "
          f"{args.loss_type} loss; effective batch {args.batch_size} x {args.grad_accum} = {pairs_per_step} "
          f"pairs{processes}")

    def save(step):
        out.save(step, policy, optimizer, compute.scaler)

    n_eval = min(len(test_pairs), args.eval_batches * args.batch_size)
    eval_chosen_tokens = sum(len(pair["chosen"]) for pair in test_pairs[:n_eval]) / n_eval
    warned = False

    def log_eval(step):
        """Evaluate and log; stop (saving nothing) if the model is broken, warn if it runs away."""
        nonlocal warned
        metrics = evaluate(policy, reference, test_pairs, test_ref, args, compute)
        log({"iter": step, "split": "test", **metrics})
        out.check(step, metrics["loss"], -metrics["logps/chosen"] / eval_chosen_tokens, "held-out chosen")
        drop = -metrics["rewards/chosen"] / args.beta  # log pi_ref(y_w|x) - log pi(y_w|x), mean over pairs
        if drop > WATCHDOG_NATS and not warned:
            print(f"warning: at step {step} the policy gives the held-out chosen responses {drop:.1f} nats less "
                  f"than the reference does (over {WATCHDOG_NATS:g}): probability is going to text in neither "
                  "response and samples may degrade; try a lower --lr or a higher --beta", flush=True)
            warned = True

    with StopSignals(compute) as stop:
        for step in range(start, args.max_iters):
            if eval_due(step, start, args.eval_interval):  # every eval_interval steps
                log_eval(step)  # stops the run, saving nothing, if the model is broken
                save(step)

            # linear warmup, then constant: the paper's schedule
            lr = args.lr * (step + 1) / args.warmup if step < args.warmup else args.lr
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.time()
            total, n_tokens, chosen_tokens = None, 0, 0
            # under torchrun each process takes its own grad_accum / world_size of the step's micro-batches
            per_process = args.grad_accum // compute.world_size
            for i, micro in enumerate(range(compute.rank * per_process, (compute.rank + 1) * per_process)):
                indices = batch_indices(len(train_pairs), args.batch_size, step * args.grad_accum + micro, args.seed)
                batch = make_batch(train_pairs, indices, args)
                if compute.world_size > 1:  # torchrun: average gradients across processes once, at the end
                    train_policy.require_backward_grad_sync = i == per_process - 1
                with compute.autocast:
                    policy_chosen, policy_rejected = pair_logps(train_policy, batch)
                    ref_chosen, ref_rejected = reference_pair_logps(
                        reference, batch, None if train_ref is None else train_ref[indices])
                losses, chosen_rewards, rejected_rewards = dpo_loss(
                    policy_chosen, policy_rejected, ref_chosen, ref_rejected, args.beta, args.loss_type,
                    args.label_smoothing)
                # the mean over the pairs of the effective batch: every micro-batch has batch_size pairs.
                # DDP divides the processes' summed gradients by their number, so x world_size (1 without it)
                compute.scaler.scale(losses.sum() / pairs_per_step * compute.world_size).backward()
                total = add_sums(total, metric_sums(losses, chosen_rewards, rejected_rewards, policy_chosen,
                                                    policy_rejected))
                n_tokens += batch[0].numel()
                chosen_tokens += sum(len(train_pairs[j]["chosen"]) for j in indices)
            metrics = means(total, pairs_per_step, compute)  # the step's one device-to-host copy
            n_tokens, chosen_tokens = compute.sum([n_tokens, chosen_tokens])
            out.check(step + 1, metrics["loss"], -metrics["logps/chosen"] * pairs_per_step / chosen_tokens,
                      "training chosen")  # step + 1: as log.jsonl numbers this step
            grad_norm = optimizer_step(policy, optimizer, compute.scaler, args.grad_clip)  # unscale, clip, step

            dt = time.time() - t0
            log({"iter": step + 1, "split": "train", **metrics, "grad_norm": grad_norm.item(), "lr": lr,
                 "dt_ms": dt * 1000, "tokens_per_s": n_tokens / dt})
            if stop.requested():  # Ctrl-C or SIGTERM: the step is done, save it and stop
                save(step + 1)
                return
        save(args.max_iters)  # the final checkpoint first, so that a crash or Ctrl-C in the final eval loses nothing
        log_eval(args.max_iters)
    print(f"next, samples side by side: python sample.py --model reference={args.ref} --model "
          f"dpo={args.out_dir} --data {args.data}")


def main(argv=None):
    args = parse_args(argv)
    # OutDir refuses before any data or model is loaded
    with user_errors(), compute_init(args) as compute, OutDir(args, "dpo", compute) as out:
        train(args, compute, out)


if __name__ == "__main__":
    main()
