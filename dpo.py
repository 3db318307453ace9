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
import math
import os
import time

import torch
import torch.nn.functional as F

from data import batch_indices, dpo_batch, load_preferences, packed_dpo_batch, tokenize_pairs
from model import (GPT2_SIZES, CtrlC, RunLog, UserError, autocast, load_model,
                   lr_at, make_optimizer, pick_device, pick_dtype, resume, save_checkpoint,
                   setup_cuda, training_arguments, user_errors)

# The paper's settings (sec. 6 and app. B): beta 0.1, batch 64, RMSprop at lr 1e-6 with 150 warmup steps;
# one epoch of HH's 160k pairs is 2,500 steps of 64.
DEFAULTS = dict(init="out/sft", data="Anthropic/hh-rlhf", out_dir=None, batch_size=8, grad_accum=8,
                max_len=512, lr=1e-6, warmup=150, max_iters=2500, eval_interval=250,
                optimizer="rmsprop", beta=0.1)
# --demo: the toy task from the demo SFT model; a minute or two on 2 CPU cores.
DEMO = dict(init="out/demo/sft", data="toy", batch_size=16, grad_accum=1, max_len=64,
            lr=2e-5, warmup=10, max_iters=80, eval_interval=20, device="cpu", optimizer="adamw")


def parse_args(argv=None):
    parser = training_arguments(__doc__.splitlines()[0], DEFAULTS, DEMO)
    parser.add_argument("--beta", type=float, help="strength of the KL constraint: small beta lets the policy "
                        "move far from the reference")
    parser.add_argument("--loss_type", default="sigmoid", choices=["sigmoid", "ipo"])
    parser.add_argument("--label_smoothing", type=float, default=0.0,
                        help="conservative DPO: the probability that a preference label is flipped")
    parser.add_argument("--ref", help="the frozen reference (default: --init)")
    parser.add_argument("--optimizer", choices=["rmsprop", "adamw"])
    parser.add_argument("--precompute_ref", action="store_true",
                        help="compute the reference log-probs once before training; keeps one model in memory")
    parser.add_argument("--share_prompt", action="store_true", help="run each pair as one row, its prompt "
                        "once (data.packed_dpo_batch): same log-probs, fewer tokens")
    parser.add_argument("--swap", action="store_true", help="train on rejected responses as if preferred "
                        "(the 'bad' model); evaluation still uses the true preferences")
    args = parser.parse(argv)
    if not args.beta > 0:
        parser.error(f"--beta must be positive, got {args.beta}")
    if not 0 <= args.label_smoothing < 0.5:
        parser.error(f"--label_smoothing must be in [0, 0.5), got {args.label_smoothing}")
    if args.label_smoothing and args.loss_type == "ipo":
        parser.error("--label_smoothing applies to the sigmoid loss only, not to --loss_type ipo")
    if args.out_dir is None:
        stem = "out/demo/dpo" if args.demo else "out/dpo"
        args.out_dir = stem + ("-bad" if args.swap else "")
    args.ref = args.ref or args.init
    return args


# ----------------------------------------------------------------------------------------------------
# The objective

def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta, loss_type="sigmoid", label_smoothing=0.0):
    """Per-pair losses and implicit rewards from summed response log-probs, each of shape (B,)."""
    # h: how much more the policy prefers y_w over y_l than the reference does, in log space
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        # eq. 7; with label_smoothing e, the preference is taken as flipped with probability e
        # (conservative DPO, as the reference implementation writes it): a bounded loss for noisy labels
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        # IPO (Azar et al., 2023, eq. 17): regress h to 1 / (2 tau), tau = beta; does not push h to infinity
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    # the implicit reward of eq. 5 (without beta log Z(x), which cancels within a pair)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def reward_accuracy(chosen_rewards, rejected_rewards):
    """Share of pairs ranked right; a tie counts as half, so a policy equal to its reference reads 0.5."""
    return ((chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()).mean()


def sequence_logps(model, input_ids, labels, positions=None, segments=None):
    """log pi(y|x): the sum of the response tokens' log-probs, in fp32, for each row (the paper's
    quantity). Averaging over tokens instead (as some libraries do) changes the objective: it stops
    penalizing a policy for the length of what it says, and beta then means something else."""
    return model.token_logps(input_ids, labels, positions, segments).sum(dim=-1)


def pair_logps(model, input_ids, labels, positions=None, segments=None):
    """(chosen, rejected) log-probs from ONE forward pass: over the 2B rows dpo_batch stacked (chosen
    rows first), or over the B rows of packed_dpo_batch (labels (2, B, W): chosen plane first)."""
    logps = sequence_logps(model, input_ids, labels, positions, segments).view(2, -1)  # (2, B)
    return logps[0], logps[1]


# ----------------------------------------------------------------------------------------------------
# The loop

def require_models(args):
    """Fail in one line before any data is loaded if --init or --ref names nothing."""
    for name in {args.init, args.ref}:
        if name not in GPT2_SIZES and name != "scratch" and not os.path.exists(name):
            raise UserError(f"no model at {name}: run `python sft.py{' --demo' if args.demo else ''}` first, "
                            "or pass --init gpt2 (and --ref) to start from the pretrained model")


def load_models(args):
    """The policy to train and its frozen reference."""
    policy = load_model(args.init, args, args.device)
    # the usual case, ref = init: a copy, not a second load (and for --init scratch, the same random model)
    reference = copy.deepcopy(policy) if args.ref == args.init else load_model(args.ref, args, args.device)
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


def make_batch(pairs, rows, args):
    """The micro-batch of pairs[rows] on the device: stacked 2B rows, or packed rows with --share_prompt."""
    return [t.to(args.device) for t in (packed_dpo_batch if args.share_prompt else dpo_batch)([pairs[i] for i in rows])]


def policy_and_reference_logps(policy, reference, pairs, rows, ref_cache, args, ctx):
    """(policy chosen, policy rejected, reference chosen, reference rejected) log-probs of pairs[rows],
    and the number of tokens the policy processed (padding included). With --precompute_ref the
    reference's come from ref_cache, rows of (chosen, rejected)."""
    batch = make_batch(pairs, rows, args)
    with ctx:
        chosen, rejected = pair_logps(policy, *batch)
        if ref_cache is not None:
            ref_chosen, ref_rejected = ref_cache[rows].to(args.device).unbind(1)
        else:
            with torch.no_grad():  # the reference is a constant: no graph, no activations kept
                ref_chosen, ref_rejected = pair_logps(reference, *batch)
    return (chosen, rejected, ref_chosen, ref_rejected), batch[0].numel()


@torch.no_grad()
def reference_logps(reference, pairs, args, ctx):
    """(N, 2) reference log-probs of every pair (chosen, rejected), in micro-batches."""
    out = []
    for start in range(0, len(pairs), args.batch_size):
        batch = make_batch(pairs, range(start, min(start + args.batch_size, len(pairs))), args)
        with ctx:
            out.append(torch.stack(pair_logps(reference, *batch), dim=1).float().cpu())
    return torch.cat(out)


METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
           "logps/chosen", "logps/rejected")  # the reference implementation's names


def add_metrics(total, losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected):
    """Add this micro-batch's sums over pairs to `total`, a tensor in METRICS order. It stays on the
    device: reading each value with .item() would make the CPU wait for the GPU seven times a micro-batch."""
    accuracy = reward_accuracy(chosen_rewards, rejected_rewards) * len(losses)
    sums = torch.stack([losses.sum(), chosen_rewards.sum(), rejected_rewards.sum(),
                        (chosen_rewards - rejected_rewards).sum(), accuracy,
                        policy_chosen.sum(), policy_rejected.sum()]).detach().float()
    return sums if total is None else total + sums


def mean_metrics(total, n_pairs):
    """The sums as a dict of means, with a single device-to-host copy."""
    return {key: value / n_pairs for key, value in zip(METRICS, total.tolist())}


@torch.no_grad()
def evaluate(policy, reference, pairs, ref_cache, args, ctx):
    """DPO metrics on the first eval_batches micro-batches of the held-out split (true preferences)."""
    policy.eval()
    total, n = None, min(len(pairs), args.eval_batches * args.batch_size)
    for start in range(0, n, args.batch_size):
        rows = list(range(start, min(start + args.batch_size, n)))
        logps, _ = policy_and_reference_logps(policy, reference, pairs, rows, ref_cache, args, ctx)
        out = dpo_loss(*logps, args.beta, args.loss_type, args.label_smoothing)
        total = add_metrics(total, *out, *logps[:2])
    policy.train()
    return mean_metrics(total, n)


def train(args):
    torch.manual_seed(args.seed)
    args.device = pick_device(args.device)
    args.dtype = pick_dtype(args.dtype, args.device)
    if args.device.startswith("cuda"):
        setup_cuda()

    require_models(args)
    train_pairs = tokenize_pairs(load_preferences(args.data, "train"), args.max_len, args.max_prompt_len)
    test_pairs = tokenize_pairs(load_preferences(args.data, "test"), args.max_len, args.max_prompt_len)
    if args.swap:  # the "bad" model: learn to prefer what the annotators rejected
        train_pairs = [{"prompt": p["prompt"], "chosen": p["rejected"], "rejected": p["chosen"]} for p in train_pairs]

    policy, reference = load_models(args)
    ctx = autocast(args.device, args.dtype)
    train_ref = test_ref = None
    if args.precompute_ref:
        # one pass of the reference over the data now, then only the policy stays in memory
        t0 = time.time()
        train_ref = reference_logps(reference, train_pairs, args, ctx)
        test_ref = reference_logps(reference, test_pairs, args, ctx)
        reference = None
        print(f"reference log-probs of {len(train_pairs) + len(test_pairs)} pairs in {time.time() - t0:.1f}s")

    optimizer = make_optimizer(policy, args.lr, args.weight_decay, args.device, kind=args.optimizer)
    scaler = torch.amp.GradScaler(args.device.split(":")[0], enabled=args.dtype == "float16")
    start = resume(args.out_dir, policy, optimizer, scaler) if args.resume else 0
    if args.compile:
        policy.compile()
        if reference is not None:
            reference.compile()
    log = RunLog(args.out_dir, start)
    pairs_per_step = args.batch_size * args.grad_accum
    print(f"{policy.num_params() / 1e6:.1f}M parameters, {args.device}, {args.dtype}; beta {args.beta}, "
          f"{args.loss_type} loss; effective batch {args.batch_size} x {args.grad_accum} = {pairs_per_step} pairs")

    def save(step):
        save_checkpoint(args.out_dir, policy, optimizer, scaler, step, args)

    def log_eval(step):
        log({"iter": step, "split": "test", **evaluate(policy, reference, test_pairs, test_ref, args, ctx)})

    with CtrlC() as ctrl_c:
        for step in range(start, args.max_iters):
            if args.eval_interval and step % args.eval_interval == 0 and not (start and step == start):
                log_eval(step)
                if step > start:
                    save(step)

            lr = lr_at(step, args.lr, args.warmup, args.max_iters, decay=False)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.time()
            total, n_tokens = None, 0
            for micro in range(args.grad_accum):
                rows = batch_indices(len(train_pairs), args.batch_size, step * args.grad_accum + micro, args.seed)
                logps, tokens = policy_and_reference_logps(policy, reference, train_pairs, rows, train_ref, args, ctx)
                out = dpo_loss(*logps, args.beta, args.loss_type, args.label_smoothing)
                # mean over the pairs of the effective batch: every micro-batch has batch_size pairs
                scaler.scale(out[0].sum() / pairs_per_step).backward()
                total = add_metrics(total, *out, *logps[:2])
                n_tokens += tokens
            metrics = mean_metrics(total, pairs_per_step)
            if not math.isfinite(metrics["loss"]):
                raise UserError(f"loss is {metrics['loss']} at step {step}; stopped, the last good checkpoint "
                                f"in {args.out_dir} is kept. Try a lower --lr or --dtype bfloat16")
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip or float("inf"))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

            dt = time.time() - t0
            log({"iter": step + 1, "split": "train", **metrics, "grad_norm": grad_norm.item(), "lr": lr,
                 "dt_ms": dt * 1000, "tokens_per_s": n_tokens / dt})
            if ctrl_c.pressed:
                save(step + 1)
                print(f"saved {args.out_dir}/ckpt.pt at step {step + 1}; continue with --resume")
                return

    log_eval(args.max_iters)
    save(args.max_iters)
    print(f"saved {args.out_dir}/ckpt.pt")


def main(argv=None):
    args = parse_args(argv)
    with user_errors():
        train(args)


if __name__ == "__main__":
    main()
