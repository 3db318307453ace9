"""Stage 2: Direct Preference Optimization (Rafailov et al., 2023) against a frozen reference.

RLHF's reward model and PPO are replaced by the policy's own implicit reward, beta log(pi / pi_ref) (README
section 1 derives it): no reward model, no sampling, no RL, a forward pass of the policy and one of the
reference per pair, and the loss

    L_DPO = -log sigmoid(beta log(pi(y_w|x) / pi_ref(y_w|x)) - beta log(pi(y_l|x) / pi_ref(y_l|x)))   (eq. 7)

    python dpo.py --beta 0.1                      # from out/sft, on Anthropic/hh-rlhf, one GPU
    python dpo.py --demo --beta 0.1               # the toy task on a CPU, from out/demo/sft
    python dpo.py --demo --beta 0.1 --swap        # the "bad" model: rejected responses as preferred
"""
import copy
import time

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from data import batch_indices, collate, dpo_batch, sft_examples, tokenized_splits
from machinery import cli
from machinery.fast import packed_dpo_batch, precompute, use_chunked_head
from machinery.models import check_same_shape, load_model, stage_of
from machinery.run import Run, runaway_warning
from model import param_groups

# The paper's settings (sec. 6 and app. B): beta 0.1, batch 64, RMSprop at lr 1e-6 with 150 warmup steps;
# one epoch of HH's 161k pairs is about 2,500 steps of 64.
DEFAULTS = dict(init="out/sft", data="Anthropic/hh-rlhf", batch_size=8, grad_accum=8, max_len=512, lr=1e-6,
                warmup=150, max_iters=2500, eval_interval=250, optimizer="rmsprop", beta=0.1)
# --demo: the toy task from the demo's SFT model, on a CPU.
DEMO = dict(init="out/demo/sft", data="toy", batch_size=8, grad_accum=1, max_len=64, lr=5e-5, warmup=10,
            max_iters=40, eval_interval=20, eval_batches=4, device="cpu", optimizer="adamw")
# dpo.py's own flags that --resume must find unchanged (the machinery knows no script's flags)
EXPERIMENT = ("ref", "swap", "beta", "loss_type", "label_smoothing", "optimizer", "share_prompt", "precompute_ref")


def parse_args(argv=None):
    parser = cli.training_parser(__doc__, DEFAULTS, DEMO)
    parser.add_argument("--beta", type=cli.positive, help="the KL constraint: small beta lets the policy move far")
    parser.add_argument("--loss_type", default="sigmoid", choices=["sigmoid", "ipo"], help="DPO's eq. 7, or IPO's")
    parser.add_argument("--label_smoothing", type=cli.fraction(0, 0.5), default=0.0, help="cDPO: P(label is wrong)")
    parser.add_argument("--ref", help="the frozen reference (default: --init)")
    parser.add_argument("--optimizer", choices=["rmsprop", "adamw"], help="rmsprop, as in the paper, or adamw")
    parser.add_argument("--precompute_ref", action="store_true", help="pi_ref scores all pairs up front: less memory")
    parser.add_argument("--share_prompt", action="store_true", help="a pair as one row, its prompt once: fewer tokens")
    parser.add_argument("--swap", action="store_true", help="prefer the rejected responses: the \"bad\" model")
    args = cli.parse(parser, DEMO, argv)
    if args.label_smoothing and args.loss_type == "ipo":
        parser.error("--label_smoothing applies to the sigmoid loss only, not to --loss_type ipo")
    if args.loss_type == "ipo" and not 1 / (2 * args.beta) < 1e6:  # IPO's target margin, in nats
        parser.error(f"--loss_type ipo: --beta {args.beta} asks a margin of 1/(2 beta) = {0.5 / args.beta:.3g} nats")
    if args.ref is None and stage_of(args.init) == "dpo":  # a DPO policy is no reference: its SFT model is
        parser.error(f"--init {args.init} is a DPO run: pass --ref too, the SFT model it was trained from")
    args.out_dir = args.out_dir or cli.default_out_dir(parser, args, "dpo-bad" if args.swap else "dpo", ("swap",))
    args.ref = args.ref or args.init
    args.next = cli.sample_command(parser, args, reference=args.ref, policy=args.out_dir)
    return args


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta, loss_type="sigmoid", label_smoothing=0.0):
    """Per-pair losses and implicit rewards from summed response log-probs, each of shape (B,)."""
    # h: how much more the policy prefers y_w over y_l than the reference does, in log space
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        # eq. 7. With label_smoothing eps > 0: conservative DPO (cDPO; Mitchell, 2023, eq. 3), each label
        # flipped with probability eps; the loss then has its minimum at a finite beta h = ln((1 - eps) / eps)
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        # IPO (Azar et al., 2023, eq. 17 of its v2): a deterministic preference sends DPO's h to infinity,
        # whatever beta; IPO regresses h to 1 / (2 beta) instead (h summed over tokens, as the DPO authors')
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    # the implicit reward beta log(pi / pi_ref) of sec. 4: eq. 5 without beta log Z(x), which cancels in a pair
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def pair_logps(model, batch):
    """log pi(y_w|x) and log pi(y_l|x) of each pair, from ONE forward pass. batch: dpo_batch's (idx, labels), 2B
    rows, chosen first; or, with --share_prompt, packed_dpo_batch's (idx, labels (2, B, W), positions, attn_mask),
    in GPT.forward's order. log pi(y|x) *sums* the response tokens' log-probs, the paper's quantity: a mean over
    tokens (as some libraries take) is no log-ratio of sequence probabilities."""
    logps = model(*batch).sum(dim=-1).view(2, -1)  # (2, B): forward(idx, labels): each label's log-prob, 0 if masked
    return logps[0], logps[1]


def get_lr(step, args):
    """The paper's schedule: linear warmup over `warmup` steps, then constant."""
    return args.lr * (step + 1) / args.warmup if step < args.warmup else args.lr


def freeze(reference, args):
    """pi_ref is fixed: eq. 3's KL is to it, and one that moved with the policy would keep h at 0 (exercise 2). On
    a GPU it needs no fp32 copy: the training dtype halves its memory (step 0's rewards are then near 0, not 0)."""
    reference.eval().requires_grad_(False)
    if args.device.startswith("cuda") and args.dtype != "float32":
        reference.to(getattr(torch, args.dtype))
    return reference


def make_batch(pairs, indices, args):
    """The micro-batch of pairs[indices] on the device: stacked 2B rows, or packed rows with --share_prompt."""
    batch = (packed_dpo_batch if args.share_prompt else dpo_batch)([pairs[i] for i in indices])
    return [t.to(args.device) for t in batch]


# What dpo.py logs, under the names the authors' code uses (accuracy and margin singular here)
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen",
           "logps/rejected")


def micro_batch(policy, reference, pairs, indices, cached, args):
    """pairs[indices] through the policy and the reference: the per-pair losses, and the sums of METRICS then
    the tokens, in one tensor left on the device (an .item() each would make the CPU wait for the GPU)."""
    batch = make_batch(pairs, indices, args)
    policy_chosen, policy_rejected = pair_logps(policy, batch)
    if cached is not None:  # --precompute_ref: the reference's rows for these pairs, scored before training
        ref_chosen, ref_rejected = cached[list(indices)].to(args.device).unbind(1)
    else:
        with torch.no_grad():  # pi_ref is a constant: no graph, no activations kept for it
            ref_chosen, ref_rejected = pair_logps(reference, batch)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, args.beta, args.loss_type, args.label_smoothing)
    # accuracy: the pairs ranked right; a tie counts half, so a policy equal to its reference reads 0.5
    right = (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()
    sums = torch.stack([losses.detach().sum(), chosen_rewards.sum(), rejected_rewards.sum(),
                        (chosen_rewards - rejected_rewards).sum(), right.sum(), policy_chosen.detach().sum(),
                        policy_rejected.detach().sum(), losses.new_full((), batch[0].numel())])
    return losses, sums.float()


@torch.no_grad()
def evaluate(policy, reference, pairs, cached, args, compute):
    """DPO metrics on the first eval_batches micro-batches of the held-out split (true preferences).
    Under torchrun each process takes every world_size-th micro-batch; the sums are added up."""
    policy.eval()
    n = min(len(pairs), args.eval_batches * args.batch_size)
    sums = [torch.zeros(len(METRICS) + 1, device=args.device)]  # a process may get no batch
    for start in range(0, n, args.batch_size)[compute.rank::compute.world_size]:
        with compute.autocast:
            sums.append(micro_batch(policy, reference, pairs, range(start, min(start + args.batch_size, n)), cached,
                                    args)[1])
    policy.train()
    return dict(zip(METRICS, (compute.all_reduce_sum(torch.stack(sums).sum(0)) / n).tolist()))


def train(args, run):
    compute = run.compute
    torch.manual_seed(args.seed)
    train_pairs, test_pairs = tokenized_splits(args.data, args.max_len, args.max_prompt_len, args.train_split,
                                               args.test_split)
    if args.swap:  # the "bad" model: learn to prefer what the annotators rejected
        train_pairs = [{"prompt": p["prompt"], "chosen": p["rejected"], "rejected": p["chosen"]} for p in train_pairs]
    batch_indices(len(train_pairs), args.batch_size, 0, args.seed)  # refuses a batch larger than the data now

    policy = load_model(args.init, args)
    # the usual case, ref = init: a copy, not a second load (and for --init scratch, the same random model)
    reference = freeze(copy.deepcopy(policy) if args.ref == args.init else load_model(args.ref, args), args)
    check_same_shape(policy, reference, args.init, args.ref)
    if args.chunked_head:  # opt-in: the same log-probs with less memory (docs/performance.md)
        policy, reference = use_chunked_head(policy), use_chunked_head(reference)
    policy.grad_checkpoint = args.grad_checkpoint  # opt-in: recompute each block in backward, for less memory
    groups = param_groups(policy, args.weight_decay)
    optimizer = torch.optim.RMSprop(groups, lr=args.lr) if args.optimizer == "rmsprop" else torch.optim.AdamW(
        groups, lr=args.lr, betas=(0.9, 0.95), fused=args.device.startswith("cuda"))  # fused: one kernel, all weights
    # --resume refuses other data, or a reference retrained since: both are fingerprinted into every checkpoint
    run.depends_on(data={"training pairs": train_pairs, "held-out pairs": test_pairs},
                   models={"reference": (args.ref, reference)})
    train_cache = test_cache = None
    if args.precompute_ref:  # the reference scores every pair once now; then only the policy stays in memory
        train_cache, test_cache = (precompute(reference, pairs, make_batch, pair_logps, args, compute)
                                   for pairs in (train_pairs, test_pairs))
        reference = None
    # the health check scores held-out replies DPO raises before every save (docs/runs.md)
    learned = sft_examples(test_pairs[:args.batch_size], "rejected" if args.swap else "chosen")
    start = run.start_or_resume(policy, optimizer, collate(learned))  # 0, or --resume's step (weights, optimizer read)
    for model in filter(None, (policy, reference)) if args.compile else ():  # (no reference once precomputed)
        model.compile()  # in place: the state_dict keys stay those of the plain model
    ddp_policy = DDP(policy) if compute.world_size > 1 else policy  # torchrun: DDP averages gradients across processes
    evaluate_now = lambda: evaluate(policy, reference, test_pairs, test_cache, args, compute)  # noqa: E731
    pairs_per_step = args.batch_size * args.grad_accum

    for step in range(start, args.max_iters):
        if args.eval_interval and step % args.eval_interval == 0:  # evaluate, check health, then save
            run.evaluate_and_save(step, evaluate_now)
        lr = get_lr(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.time()
        step_batches = [batch_indices(len(train_pairs), args.batch_size, step * args.grad_accum + micro, args.seed)
                        for micro in range(args.grad_accum)]
        mine = step_batches[compute.rank::compute.world_size]  # torchrun: this process's micro-batches (alone: all)
        sums = []
        for i, indices in enumerate(mine):
            ddp_policy.require_backward_grad_sync = i == len(mine) - 1  # torchrun: sync gradients on the last only
            with compute.autocast:  # mixed precision on a GPU (bf16 or fp16 matmuls); nothing on a CPU
                losses, batch_sums = micro_batch(ddp_policy, reference, train_pairs, indices, train_cache, args)
            # the mean over the step's pairs; the scaler: fp16's loss scaling (else x 1); x world_size: DDP averages
            compute.scaler.scale(losses.sum() / pairs_per_step * compute.world_size).backward()
            sums.append(batch_sums)
        compute.scaler.unscale_(optimizer)  # fp16: the true gradients, to clip them
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip or float("inf"))
        compute.scaler.step(optimizer)  # fp16: skipped if a gradient overflowed
        compute.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        totals = compute.all_reduce_sum(torch.stack(sums).sum(0)).tolist()  # torchrun: summed over the processes
        dt = time.time() - t0  # after .tolist(), which waits for the GPU: the whole step is timed
        run.log({"iter": step + 1, **{name: total / pairs_per_step for name, total in zip(METRICS, totals)},
                 "grad_norm": grad_norm.item(), "lr": lr, "dt_ms": dt * 1000, "tokens_per_s": totals[-1] / dt})
        if run.stop_requested():  # Ctrl-C or SIGTERM: this step is done; save it and stop
            break
    run.finish(step + 1, evaluate_now)  # the last checkpoint (evaluated, checked, saved), and what to run next


def main(argv=None):
    args = parse_args(argv)
    models = {"--init": args.init, "--ref": args.ref}
    with Run(args, "dpo", EXPERIMENT, models, warn=runaway_warning(args.beta)) as run:  # refuses before loading
        train(args, run)


if __name__ == "__main__":
    main()
