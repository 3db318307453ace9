"""Stage 2: Direct Preference Optimization (Rafailov et al., 2023) against a frozen reference.

RLHF fits a reward model r(x, y) to preference pairs, then maximizes r with PPO under a KL penalty
beta * KL(pi || pi_ref). That KL-constrained problem has a closed-form optimum,

    pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x),                                       (eq. 4)

so every policy defines the reward it is optimal for: r(x, y) = beta log(pi(y|x) / pi_ref(y|x))
+ beta log Z(x) (eq. 5). Put that reward into the Bradley-Terry preference model and Z(x) cancels,
because both responses share the prompt x. What is left is a classification loss on the policy itself:

    L_DPO = -log sigmoid(beta log(pi(y_w|x) / pi_ref(y_w|x)) - beta log(pi(y_l|x) / pi_ref(y_l|x)))   (eq. 7)

No reward model, no sampling, no RL: a forward pass of the policy and one of the reference per pair.

    python dpo.py --beta 0.1                      # from out/sft, on Anthropic/hh-rlhf, one GPU
    python dpo.py --demo --beta 0.1               # the toy task on a CPU, from out/demo/sft
    python dpo.py --demo --beta 0.1 --swap        # the "bad" model: rejected responses as preferred
"""
import copy
import time

import torch
import torch.nn.functional as F

from data import batch_indices, collate, dpo_batch, sft_examples, tokenized_splits
from machinery import cli
from machinery.checkpoints import check_same_shape, load_model, stage_of
from machinery.compute import make_optimizer, optimizer_step, set_lr, wrap
from machinery.fast import packed_dpo_batch
from machinery.run import Run
from machinery.runlog import Runaway

# The paper's settings (sec. 6 and app. B): beta 0.1, batch 64, RMSprop at lr 1e-6 with 150 warmup steps;
# one epoch of HH's 160k pairs is 2,500 steps of 64.
DEFAULTS = dict(init="out/sft", data="Anthropic/hh-rlhf", batch_size=8, grad_accum=8, max_len=512, lr=1e-6,
                warmup=150, max_iters=2500, eval_interval=250, optimizer="rmsprop", beta=0.1)
# --demo: the toy task from the demo's SFT model, on a CPU.
DEMO = dict(init="out/demo/sft", data="toy", batch_size=16, grad_accum=1, max_len=64, lr=2e-5, warmup=10,
            max_iters=80, eval_interval=20, device="cpu", optimizer="adamw")
EXPERIMENT = ("ref", "swap", "beta", "loss_type", "label_smoothing", "optimizer", "share_prompt", "precompute_ref")


def parse_args(argv=None):
    parser = cli.training_parser(__doc__, DEFAULTS, DEMO)
    parser.add_argument("--beta", type=cli.positive, help="strength of the KL constraint: small beta lets the "
                        "policy move far from the reference")
    parser.add_argument("--loss_type", default="sigmoid", choices=["sigmoid", "ipo"],
                        help="sigmoid: DPO's eq. 7; ipo: the squared loss of IPO (Azar et al., 2023)")
    parser.add_argument("--label_smoothing", type=cli.fraction(0, 0.5), default=0.0,
                        help="conservative DPO: the probability that a preference label is flipped")
    parser.add_argument("--ref", help="the frozen reference (default: --init)")
    parser.add_argument("--optimizer", choices=["rmsprop", "adamw"], help="rmsprop, as in the paper, or adamw")
    parser.add_argument("--precompute_ref", action="store_true",
                        help="compute the reference log-probs once before training; keeps one model in memory")
    parser.add_argument("--share_prompt", action="store_true", help="run each pair as one row, its prompt "
                        "once (machinery/fast.py): same log-probs, fewer tokens")
    parser.add_argument("--swap", action="store_true", help="train on rejected responses as if preferred "
                        "(the \"bad\" model); evaluation still uses the true preferences")
    args = cli.parse(parser, DEMO, argv)
    if args.label_smoothing and args.loss_type == "ipo":
        parser.error("--label_smoothing applies to the sigmoid loss only, not to --loss_type ipo")
    if args.loss_type == "ipo" and not 1 / (2 * args.beta) < 1e6:  # IPO's target margin, in nats
        parser.error(f"--beta {args.beta} with --loss_type ipo asks for a margin of 1/(2 beta) = {1 / (2 * args.beta):.3g} nats")
    if args.ref is None and stage_of(args.init) == "dpo":  # a DPO policy is no reference: its SFT model is
        parser.error(f"--init {args.init} is a DPO run: pass --ref too, the SFT model it was trained from")
    args.out_dir = args.out_dir or cli.default_out_dir(parser, args, "dpo-bad" if args.swap else "dpo", ("swap",))
    args.ref = args.ref or args.init
    if args.demo and args.ref == args.init:
        args.next = "python sample.py --demo"
    else:
        args.next = cli.next_command(parser, args, "sample.py", ("data", "device"),
                                     [("--model", f"reference={args.ref}"), ("--model", f"dpo={args.out_dir}")])
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
        # each label counts as flipped with probability eps. The loss still grows linearly in |h|, but its
        # minimum is at a finite beta h = ln((1 - eps) / eps), so a pair stops pulling once it gets there.
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        # IPO (Azar et al., 2023, arXiv:2310.12036, eq. 17 of its v2): when a preference is deterministic
        # in the data, DPO's optimum pushes h to infinity whatever beta, and the KL term stops holding the
        # policy back (their sec. 4). IPO regresses h to 1 / (2 tau), tau = beta, instead. h sums log-probs,
        # as the DPO authors' code does; TRL averages them per token, so the same beta differs there.
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

    The batch is dpo_batch's 2B rows (chosen rows first), or with --share_prompt packed_dpo_batch's B
    rows whose labels are (2, B, W), chosen plane first. log pi(y|x) is the *sum* of the response tokens'
    log-probs, in fp32: the paper's quantity. Averaging over tokens instead (as some libraries do) makes h
    a difference of per-token means, no longer a log-ratio of sequence probabilities, so the loss is no
    longer eq. 7; and since a mean is |y| times smaller than a sum, a given beta then acts about |y| times
    smaller, and by a different factor for each pair when |y_w| differs from |y_l|.
    """
    logps = model(*batch).sum(dim=-1).view(2, -1)  # (2, B): the forward with labels gives log-probs
    return logps[0], logps[1]


def get_lr(step, args):
    """The paper's schedule: linear warmup over `warmup` steps, then constant."""
    return args.lr * (step + 1) / args.warmup if step < args.warmup else args.lr


# ----------------------------------------------------------------------------------------------------
# The reference, and the loop

def freeze(reference, device, dtype):
    """pi_ref is fixed: the objective (eq. 3) is a KL to it, and a reference that moved with the policy
    would change the problem (h would stay 0). No gradients, no dropout. On a GPU its weights are cast to
    the training dtype (bf16 or fp16): it is never updated, so it needs no fp32 master copy, which halves
    its memory; the price is that at step 0 on a GPU the rewards are close to 0 rather than exactly 0."""
    reference.eval().requires_grad_(False)
    if device.startswith("cuda") and dtype != "float32":
        reference.to(getattr(torch, dtype))
    return reference


def make_batch(pairs, indices, args):
    """The micro-batch of pairs[indices] on the device: stacked 2B rows, or packed rows with --share_prompt."""
    selected = [pairs[i] for i in indices]
    batch = packed_dpo_batch(selected) if args.share_prompt else dpo_batch(selected)
    return [t.to(args.device) for t in batch]


def reference_logps(reference, batch, cached, indices):
    """The reference's (chosen, rejected) log-probs: the rows precomputed for these pairs (--precompute_ref),
    or one forward pass without a graph: pi_ref is a constant, so no activations are kept for it."""
    if cached is not None:
        return cached[indices].to(batch[0].device).unbind(1)
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
        with compute.autocast:
            logps[start:end] = torch.stack(pair_logps(reference, make_batch(pairs, range(start, end), args)), 1).float()
    return compute.all_reduce_sum(logps).cpu()


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


def means(sums, n_pairs, compute):
    """A list of metric_sums as means over n_pairs (summed over the processes under torchrun first), with
    one device-to-host copy for all of them."""
    totals = torch.stack([sum(s[name] for s in sums).float() for name in METRICS])
    return dict(zip(METRICS, (compute.all_reduce_sum(totals) / n_pairs).tolist()))


@torch.no_grad()
def evaluate(policy, reference, pairs, cached, args, compute):
    """DPO metrics on the first eval_batches micro-batches of the held-out split (true preferences).
    Under torchrun each process takes every world_size-th micro-batch; the sums are added up."""
    policy.eval()
    n = min(len(pairs), args.eval_batches * args.batch_size)
    sums = [{name: torch.zeros((), device=args.device) for name in METRICS}]  # a process may get no batch
    for start in range(0, n, args.batch_size)[compute.rank::compute.world_size]:
        indices = list(range(start, min(start + args.batch_size, n)))
        batch = make_batch(pairs, indices, args)
        with compute.autocast:
            policy_chosen, policy_rejected = pair_logps(policy, batch)
            ref_chosen, ref_rejected = reference_logps(reference, batch, cached, indices)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, args.beta, args.loss_type, args.label_smoothing)
        sums.append(metric_sums(losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected))
    policy.train()
    return means(sums, n, compute)


def train(args, run):
    compute = run.compute
    torch.manual_seed(args.seed)
    train_pairs, test_pairs = tokenized_splits(args.data, args.max_len, args.max_prompt_len, args.train_split,
                                               args.test_split)
    if args.swap:  # the "bad" model: learn to prefer what the annotators rejected
        train_pairs = [{"prompt": p["prompt"], "chosen": p["rejected"], "rejected": p["chosen"]} for p in train_pairs]

    policy = load_model(args.init, args)
    # the usual case, ref = init: a copy, not a second load (and for --init scratch, the same random model)
    reference = copy.deepcopy(policy) if args.ref == args.init else load_model(args.ref, args)
    check_same_shape(policy, reference, args.init, args.ref)  # DPO starts the policy at the reference
    reference = freeze(reference, args.device, args.dtype)
    policy.grad_checkpoint = args.grad_checkpoint  # recompute each block in backward: memory for compute
    optimizer = make_optimizer(policy, args.lr, args.weight_decay, args.device, kind=args.optimizer)
    learned = sft_examples(test_pairs[:args.batch_size], "rejected" if args.swap else "chosen")  # the text DPO raises
    start = run.start(policy, optimizer, held_out=collate(learned), data=train_pairs, examples=len(train_pairs),
                      reference=(args.ref, reference))
    train_cache = test_cache = None
    if args.precompute_ref:  # the reference scores every pair once now; then only the policy stays in memory
        train_cache = precompute_reference(reference, train_pairs, args, compute)
        test_cache = precompute_reference(reference, test_pairs, args, compute)
        reference = None
    if args.compile:
        policy.compile()
        if reference is not None:
            reference.compile()
    train_policy = wrap(policy, compute)  # torchrun: DDP averages the processes' gradients in backward
    pairs_per_step = args.batch_size * args.grad_accum
    print(f"{policy.num_params() / 1e6:.1f}M parameters, {args.device}, {args.dtype}; beta {args.beta}, "
          f"{args.loss_type} loss; effective batch {args.batch_size} x {args.grad_accum} = {pairs_per_step} pairs")

    def evaluate_now():
        return evaluate(policy, reference, test_pairs, test_cache, args, compute)

    for step in run.steps(start):  # range(start, max_iters); Ctrl-C and SIGTERM end it after a whole step
        if run.eval_due(step):  # every eval_interval steps: evaluate, then save if the model is healthy
            run.checkpoint(step, evaluate_now)
        lr = get_lr(step, args)
        set_lr(optimizer, lr)
        t0 = time.time()
        sums, n_tokens = [], 0
        micro_batches, loss_scale = compute.share(args.grad_accum)  # torchrun: this process's part of the step
        for i, micro in enumerate(micro_batches):
            indices = batch_indices(len(train_pairs), args.batch_size, step * args.grad_accum + micro, args.seed)
            batch = make_batch(train_pairs, indices, args)
            compute.sync(train_policy, last=i == len(micro_batches) - 1)  # torchrun: average gradients at the end
            with compute.autocast:  # mixed precision on a GPU (bf16 or fp16 matmuls); nothing on a CPU
                policy_chosen, policy_rejected = pair_logps(train_policy, batch)
                ref_chosen, ref_rejected = reference_logps(reference, batch, train_cache, indices)
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                policy_chosen, policy_rejected, ref_chosen, ref_rejected, args.beta, args.loss_type, args.label_smoothing)
            # the mean over the step's pairs: every micro-batch has batch_size of them
            compute.scaler.scale(losses.sum() / pairs_per_step * loss_scale).backward()
            sums.append(metric_sums(losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected))
            n_tokens += batch[0].numel()
        metrics = means(sums, pairs_per_step, compute)  # the step's one device-to-host copy
        grad_norm = optimizer_step(policy, optimizer, compute.scaler, args.grad_clip)  # unscale, clip, step
        dt = time.time() - t0
        run.log({"iter": step + 1, **metrics, "grad_norm": grad_norm.item(), "lr": lr, "dt_ms": dt * 1000,
                 "tokens_per_s": compute.all_reduce_sum(float(n_tokens)) / dt})

    if run.finish(evaluate_now):  # the last checkpoint: evaluated, checked, then saved
        print(f"next, samples side by side: {args.next}")


def main(argv=None):
    args = parse_args(argv)
    models = {"--init": args.init, "--ref": args.ref}
    with Run(args, "dpo", EXPERIMENT, models, watch=Runaway(args.beta)) as run:  # refuses here, before any loading
        train(args, run)


if __name__ == "__main__":
    main()
