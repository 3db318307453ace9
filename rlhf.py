"""What DPO replaced: RLHF's stage 2, a reward model, and stage 3, PPO against it, from scratch.

Stage 2 fits a reward r(x, y) to the preference pairs DPO trains on, with the Bradley-Terry loss
-log sigmoid(r(x, y_w) - r(x, y_l)): the SFT model's transformer with a scalar head read at the response's
last token (its EOS). Stage 3 samples replies from the policy and improves it with PPO (Schulman et al.,
2017) on the reward model's score minus a per-token KL penalty to pi_ref, as Ziegler et al. (2019),
Stiennon et al. (2020) and Ouyang et al. (2022) do; a value model (initialized from the reward model, as
Ouyang et al.'s) and GAE give each token its advantage. With --oracle, PPO optimizes the toy task's true
reward instead: PPO-GT of the DPO paper's fig. 2.

    python rlhf.py reward --demo                   # stage 2 -> out/demo/reward, from out/demo/sft
    python rlhf.py ppo --demo --kl_coef 0.1        # stage 3 -> out/demo/ppo, against out/demo/reward
    python rlhf.py ppo --demo --oracle             # PPO-GT  -> out/demo/ppo-oracle
"""
import copy
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import batch_indices, collate, get_tokenizer, inputs_and_labels, sft_examples, tokenized_splits, toy_reward
from machinery import UserError, cli
from machinery.models import load_checkpoint, load_model, load_weights
from machinery.run import Run
from model import GPT, IGNORE_INDEX, GPTConfig, param_groups
from sample import complete


def get_lr(step, args):
    """Linear warmup over `warmup` steps, then constant (as dpo.py's schedule)."""
    return args.lr * (step + 1) / args.warmup if step < args.warmup else args.lr


def freeze(model, args):
    """A model that only scores (pi_ref, the reward model): no gradients; on a GPU, in the training dtype."""
    model.eval().requires_grad_(False)
    if args.device.startswith("cuda") and args.dtype != "float32":
        model.to(getattr(torch, args.dtype))
    return model


def adamw(model, lr, args):
    """AdamW (betas 0.9, 0.95, as sft.py and dpo.py), weight decay on the matrices only."""
    return torch.optim.AdamW(param_groups(model, args.weight_decay), lr=lr, betas=(0.9, 0.95),
                             fused=args.device.startswith("cuda"))


def optimizer_steps(scaler, optimizers, models, grad_clip):
    """One step of each optimizer on the gradients of one scaled backward: unscale all, clip each model, step
    all, then one scaler update (fp16's loss scale moves once a step, however many optimizers share it)."""
    for optimizer in optimizers:
        scaler.unscale_(optimizer)  # fp16: the true gradients, to clip them
    norms = [torch.nn.utils.clip_grad_norm_(m.parameters(), grad_clip or float("inf")) for m in models]
    for optimizer in optimizers:
        scaler.step(optimizer)  # fp16: skipped if a gradient overflowed
        optimizer.zero_grad(set_to_none=True)
    scaler.update()
    return norms


class Scalar(nn.Module):
    """A GPT's transformer with a scalar head: one number per position. The reward model reads it at a
    reply's last token (its EOS), the value model at every reply token."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.gpt = GPT(config)
        self.head = nn.Linear(config.n_embd, 1)
        nn.init.zeros_(self.head.weight)  # a constant 0 at first: every pair's Bradley-Terry loss is ln 2
        nn.init.zeros_(self.head.bias)

    def forward(self, idx):
        return self.head(self.gpt.hidden_states(idx)).squeeze(-1).float()  # (B, T)


def scalar_from(gpt):
    """A Scalar whose transformer starts as gpt's."""
    scalar = Scalar(gpt.config).to(gpt.transformer.wte.weight.device)
    scalar.gpt.load_state_dict(gpt.state_dict())
    return scalar


def load_scalar(path, device):
    """A reward model saved by `rlhf.py reward`."""
    checkpoint = load_checkpoint(os.path.join(path, "ckpt.pt"))
    if checkpoint.get("stage") != "reward":
        raise UserError(f"{path} was written by {checkpoint.get('stage')}.py, not by `rlhf.py reward`: give a reward "
                        "model, or --oracle")
    scalar = Scalar(GPTConfig(**checkpoint["config"]))
    load_weights(scalar, checkpoint["model"], where=path)
    return scalar.to(device)


def full_rows(sequences, device):
    """Whole token sequences padded into one batch, and the index of each one's last token, (B,)."""
    width = max(len(s) for s in sequences)
    ids = torch.tensor([s + [0] * (width - len(s)) for s in sequences], device=device)  # padding: never seen
    return ids, torch.tensor([len(s) - 1 for s in sequences], device=device)


def scores_at_last(scalar, ids, last):
    """The reward model's r(x, y): its number at each row's last token."""
    return scalar(ids)[torch.arange(len(ids), device=ids.device), last]


# ----------------------------------------------------------------------------------------------------
# Stage 2: the reward model

def reward_loss(chosen_scores, rejected_scores):
    """Bradley-Terry: -log p(y_w > y_l) = -log sigmoid(r_w - r_l), per pair."""
    return -F.logsigmoid(chosen_scores - rejected_scores)


def pair_scores(reward_model, pairs, device):
    """r(x, y_w) and r(x, y_l) of each pair, from one forward pass over the 2B stacked rows."""
    sequences = [p["prompt"] + p["chosen"] for p in pairs] + [p["prompt"] + p["rejected"] for p in pairs]
    scores = scores_at_last(reward_model, *full_rows(sequences, device))
    return scores[:len(pairs)], scores[len(pairs):]


@torch.no_grad()
def evaluate_reward(reward_model, pairs, args):
    """Held-out loss, accuracy (the share of pairs ranked right) and mean margin r_w - r_l."""
    reward_model.eval()
    pairs = pairs[:args.eval_batches * args.batch_size]
    chosen, rejected = zip(*[pair_scores(reward_model, pairs[s:s + args.batch_size], args.device)
                             for s in range(0, len(pairs), args.batch_size)])
    chosen, rejected = torch.cat(chosen), torch.cat(rejected)
    reward_model.train()
    return {"loss": reward_loss(chosen, rejected).mean().item(), "accuracy": (chosen > rejected).float().mean().item(),
            "margin": (chosen - rejected).mean().item()}


def reward_health(reward_model, batch):
    """The health check's measure for a reward model: its Bradley-Terry loss on held-out pairs (ln 2: a guess)."""
    ids, last = batch
    scores = scores_at_last(reward_model, ids, last)
    half = len(scores) // 2
    return reward_loss(scores[:half], scores[half:]).mean().item()


def train_reward(args, run):
    compute = run.compute
    torch.manual_seed(args.seed)
    train_pairs, test_pairs = tokenized_splits(args.data, args.max_len, args.max_prompt_len, args.train_split,
                                               args.test_split)
    batch_indices(len(train_pairs), args.batch_size, 0, args.seed)  # refuses a batch larger than the data now
    reward_model = scalar_from(load_model(args.init, args))  # the SFT model's transformer, and a new head
    optimizer = adamw(reward_model, args.lr, args)
    run.depends_on(data={"training pairs": train_pairs, "held-out pairs": test_pairs})
    held_out = test_pairs[:args.batch_size]
    rows = full_rows([p["prompt"] + p["chosen"] for p in held_out] + [p["prompt"] + p["rejected"] for p in held_out],
                     args.device)
    start = run.start_or_resume(reward_model, optimizer, rows,
                                health=dict(measure=reward_health, uniform=math.log(2)))
    for step in range(start, args.max_iters):
        if args.eval_interval and step % args.eval_interval == 0:
            run.evaluate_and_save(step, lambda: evaluate_reward(reward_model, test_pairs, args))
        lr = get_lr(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0, loss_sum, correct = time.time(), 0.0, 0.0
        pairs_per_step = args.batch_size * args.grad_accum
        for micro in range(args.grad_accum):
            indices = batch_indices(len(train_pairs), args.batch_size, step * args.grad_accum + micro, args.seed)
            with compute.autocast:
                chosen, rejected = pair_scores(reward_model, [train_pairs[i] for i in indices], args.device)
                losses = reward_loss(chosen, rejected)
            compute.scaler.scale(losses.sum() / pairs_per_step).backward()  # the scaler: fp16's loss scaling
            loss_sum += losses.detach().sum()
            correct += (chosen > rejected).float().sum()
        grad_norm, = optimizer_steps(compute.scaler, [optimizer], [reward_model], args.grad_clip)
        run.log({"iter": step + 1, "loss": float(loss_sum) / pairs_per_step, "accuracy": float(correct) / pairs_per_step,
                 "grad_norm": grad_norm.item(), "lr": lr, "dt_ms": (time.time() - t0) * 1000})
        if run.stop_requested():
            break
    run.finish(step + 1, lambda: evaluate_reward(reward_model, test_pairs, args))


# ----------------------------------------------------------------------------------------------------
# Stage 3: PPO

def kl_penalized_rewards(policy_logps, ref_logps, scores, mask, kl_coef):
    """The per-token reward of RLHF: -kl_coef (log pi - log pi_ref) at every reply token, a sample of the KL
    penalty of eq. 3, plus the reward model's score (or the oracle's) at the reply's last token. (B, T)."""
    rewards = -kl_coef * (policy_logps - ref_logps) * mask
    last = mask.cumsum(1).argmax(1)  # the last reply token of each row
    rewards[torch.arange(len(rewards)), last] += scores
    return rewards


def gae(rewards, values, mask, gamma, lam):
    """Generalized advantage estimation (Schulman et al., 2016) over each row's reply tokens: with
    delta_t = r_t + gamma V_{t+1} - V_t (V = 0 after the last token), A_t = sum_k (gamma lam)^k delta_{t+k}.
    Returns (advantages, returns = advantages + values), 0 off the reply."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(len(rewards), device=rewards.device)
    next_value = torch.zeros(len(rewards), device=rewards.device)
    for t in reversed(range(rewards.size(1))):
        on = mask[:, t].float()
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * on
        advantages[:, t] = running
        next_value = values[:, t] * on  # a padding position (after the reply) passes a value of 0 back
    return advantages, (advantages + values) * mask


def ppo_loss(new_logps, old_logps, advantages, mask, clip):
    """The clipped surrogate (Schulman et al., 2017, eq. 7), as a loss: -min(ratio A, clip(ratio) A) per reply
    token, averaged over them. Past the clip, in the direction the advantage pushes, the gradient is 0."""
    ratio = torch.exp(new_logps - old_logps)
    surrogate = torch.min(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)
    return -(surrogate * mask).sum() / mask.sum()


def value_loss(values, returns, mask):
    """0.5 (V - return)^2, averaged over the reply tokens."""
    return 0.5 * (((values - returns) ** 2) * mask).sum() / mask.sum()


def rollouts(policy, prompts, args, step, tokenizer):
    """One sample per prompt from the policy, each row with its own seed (a pure function of the step, so a
    resumed run samples what a straight one would), cut at the next "Human:" turn; and the texts."""
    generators = [torch.Generator(device=args.device).manual_seed(args.seed * 100003 + step * len(prompts) + i)
                  for i in range(len(prompts))]
    policy.eval()
    new, texts = complete(policy, prompts, tokenizer, generators, args.max_new_tokens)
    policy.train()
    return new, texts


def oracle(prompts, texts, tokenizer):
    """The toy task's true reward of each reply (texts) to its prompt (token ids)."""
    return [toy_reward(tokenizer.decode(prompt), text) for prompt, text in zip(prompts, texts)]


@torch.no_grad()
def score(prompts, responses, texts, reward_model, args, tokenizer):
    """The reward of each rollout: the reward model's r(x, y), or with --oracle the toy task's true reward."""
    if args.oracle:
        return torch.tensor(oracle(prompts, texts, tokenizer), device=args.device)
    return scores_at_last(reward_model, *full_rows([p + r for p, r in zip(prompts, responses)], args.device))


@torch.no_grad()
def evaluate_policy(policy, reference, reward_model, prompts, args, tokenizer):
    """On held-out prompts, one sample each (fixed seeds): the mean reward PPO optimizes, the oracle's, and
    the KL from the reference estimated on those samples (sum over tokens of log pi - log pi_ref)."""
    responses, texts = rollouts(policy, prompts, args, -1, tokenizer)
    ids, labels = (t.to(args.device) for t in collate([inputs_and_labels(p, r) for p, r in zip(prompts, responses)]))
    kl = (policy(ids, labels) - reference(ids, labels)).sum(1)
    metrics = {"reward": score(prompts, responses, texts, reward_model, args, tokenizer).mean().item(), "kl": kl.mean().item(),
               "length": sum(map(len, responses)) / len(responses)}
    if args.data == "toy":
        metrics["oracle_reward"] = sum(oracle(prompts, texts, tokenizer)) / len(texts)
    return metrics


def value_health(value_model, ids, start_scale):
    """The health check's extra test for PPO's value model, () -> what is wrong or None: its predictions on
    held-out text must be finite and within 100 times the scale they started at (returns are rewards of a
    few units; a value model that predicts thousands has diverged)."""
    def check():
        was_training = value_model.training
        value_model.eval()
        with torch.no_grad():
            scale = value_model(ids).abs().mean().item()
        value_model.train(was_training)
        cut = 100 * (1 + start_scale)
        if not scale <= cut:  # `not <=`: nan fails too
            return (f"the value model predicts values of {scale:.3g} on average on held-out text, over {cut:.3g} (100 "
                    f"times its start): it has diverged. Try a lower --value_lr")
    return check


def train_ppo(args, run):
    compute = run.compute
    torch.manual_seed(args.seed)
    tokenizer = get_tokenizer()
    train_pairs, test_pairs = tokenized_splits(args.data, args.max_len, args.max_prompt_len, args.train_split,
                                               args.test_split)
    batch_indices(len(train_pairs), args.batch_size, 0, args.seed)  # refuses a batch larger than the data now
    prompts = [p["prompt"][-(args.max_len - args.max_new_tokens):] for p in train_pairs]  # room for a reply
    test_prompts = [p["prompt"][-(args.max_len - args.max_new_tokens):] for p in test_pairs[:args.eval_prompts]]
    policy = load_model(args.init, args)
    reference = freeze(copy.deepcopy(policy), args)  # pi_ref: the SFT model, frozen
    reward_model = None if args.oracle else freeze(load_scalar(args.reward, args.device), args)
    # the value model starts as the reward model (Ouyang et al., 2022), or for PPO-GT as the SFT model
    if reward_model is not None:
        value_model = copy.deepcopy(reward_model).float().requires_grad_(True).train()
    else:
        value_model = scalar_from(policy)
    optimizer, value_optimizer = adamw(policy, args.lr, args), adamw(value_model, args.value_lr, args)
    # --resume refuses other data, another reference, or a reward model retrained since the run started
    depends = {"reference": (args.init, reference)}
    if reward_model is not None:
        depends["reward model"] = (args.reward, reward_model)
    run.depends_on(data={"training pairs": train_pairs, "held-out pairs": test_pairs}, models=depends)
    held_out = collate(sft_examples(test_pairs[:args.batch_size], "chosen"))
    value_ids = held_out[0].to(args.device)
    with torch.no_grad():
        start_scale = value_model(value_ids).abs().mean().item()
    start = run.start_or_resume(policy, optimizer, held_out,
                                extra={"value": value_model, "value_optimizer": value_optimizer},
                                health=dict(checks=[value_health(value_model, value_ids, start_scale)]))
    evaluate_now = lambda: evaluate_policy(policy, reference, reward_model, test_prompts, args, tokenizer)  # noqa: E731
    for step in range(start, args.max_iters):  # one PPO iteration: rollouts, their advantages, then a few epochs
        if args.eval_interval and step % args.eval_interval == 0:
            run.evaluate_and_save(step, evaluate_now)
        lr = get_lr(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for group in value_optimizer.param_groups:
            group["lr"] = args.value_lr * lr / args.lr
        t0 = time.time()
        # 1. rollouts: a batch of replies sampled from the current policy
        batch_prompts = [prompts[i] for i in batch_indices(len(prompts), args.batch_size, step, args.seed)]
        responses, texts = rollouts(policy, batch_prompts, args, step, tokenizer)
        ids, labels = (t.to(args.device) for t in collate([inputs_and_labels(p, r)
                                                            for p, r in zip(batch_prompts, responses)]))
        mask = (labels != IGNORE_INDEX).float()  # the reply's tokens
        # 2. their rewards and advantages, with the policy as it was when it sampled them ("old")
        with torch.no_grad():
            old_logps = policy(ids, labels)
            ref_logps = reference(ids, labels)
            values = value_model(ids) * mask  # V of the state before each reply token
            scores = score(batch_prompts, responses, texts, reward_model, args, tokenizer)
        rewards = kl_penalized_rewards(old_logps, ref_logps, scores, mask, args.kl_coef)
        advantages, returns = gae(rewards, values, mask, args.gamma, args.lam)
        on = mask.bool()  # advantages whitened (shifted to mean 0, scaled to standard deviation 1) over the batch's
        # reply tokens, as is common (Ziegler et al.): PPO's step size then does not depend on the reward's scale
        advantages = ((advantages - advantages[on].mean()) / (advantages[on].std() + 1e-8)) * mask
        # 3. PPO epochs: a few passes over the rollouts, in minibatches, the policy kept near "old" by the clip
        stats = {"pg_loss": 0.0, "value_loss": 0.0, "clipped": 0.0}
        size = args.batch_size // args.minibatches
        for epoch in range(args.ppo_epochs):
            order = torch.randperm(args.batch_size, generator=torch.Generator().manual_seed(step * 1009 + epoch))
            for first in range(0, args.batch_size, size):
                mb = order[first:first + size].to(args.device)
                with compute.autocast:
                    new_logps = policy(ids[mb], labels[mb])
                    pg_loss = ppo_loss(new_logps, old_logps[mb], advantages[mb], mask[mb], args.clip)
                    v_loss = value_loss(value_model(ids[mb]), returns[mb], mask[mb])
                # one backward for both: two separate models, each gets only its own gradient; one loss scale
                compute.scaler.scale(pg_loss + v_loss).backward()
                optimizer_steps(compute.scaler, [optimizer, value_optimizer], [policy, value_model], args.grad_clip)
                ratio = torch.exp(new_logps.detach() - old_logps[mb])
                clipped = ((ratio - 1).abs() > args.clip).float() * mask[mb]
                stats["pg_loss"] += pg_loss.item()
                stats["value_loss"] += v_loss.item()
                stats["clipped"] += (clipped.sum() / mask[mb].sum()).item()
        updates = args.ppo_epochs * args.minibatches
        record = {"iter": step + 1, "loss": stats["pg_loss"] / updates, "value_loss": stats["value_loss"] / updates,
                  "clip_fraction": stats["clipped"] / updates, "reward": scores.mean().item(),
                  "kl": ((old_logps - ref_logps) * mask).sum(1).mean().item(), "length": mask.sum(1).mean().item(),
                  "lr": lr, "dt_ms": (time.time() - t0) * 1000}
        if args.data == "toy":
            record["oracle_reward"] = sum(oracle(batch_prompts, texts, tokenizer)) / len(texts)
        run.log(record)
        if run.stop_requested():
            break
    run.finish(step + 1, evaluate_now)


# ----------------------------------------------------------------------------------------------------
# The command line: two stages

REWARD = dict(init="out/sft", data="Anthropic/hh-rlhf", batch_size=8, grad_accum=8, max_len=512, lr=1e-5, warmup=50,
              max_iters=500, eval_interval=100)
REWARD_DEMO = dict(init="out/demo/sft", data="toy", batch_size=16, grad_accum=1, max_len=64, lr=3e-3, warmup=10,
                   max_iters=100, eval_interval=25, device="cpu")
PPO = dict(init="out/sft", data="Anthropic/hh-rlhf", batch_size=16, grad_accum=1, max_len=512, lr=1e-6, warmup=10,
           max_iters=200, eval_interval=25)
PPO_DEMO = dict(init="out/demo/sft", data="toy", batch_size=32, grad_accum=1, max_len=64, lr=1e-4, warmup=5,
                max_iters=40, eval_interval=10, device="cpu")
PPO_EXPERIMENT = ("reward", "oracle", "kl_coef", "value_lr", "ppo_epochs", "minibatches", "clip", "gamma", "lam",
                  "max_new_tokens")


def parse_args(argv):
    usage = ("usage: python rlhf.py {reward,ppo} [flags]: `reward` trains a reward model on preference pairs (stage "
             "2), `ppo` a policy against it (stage 3); python rlhf.py STAGE --help lists each one's flags")
    if argv[:1] in (["-h"], ["--help"]):
        print(usage + "\n\n" + __doc__.strip())
        sys.exit(0)
    if not argv or argv[0] not in ("reward", "ppo"):
        sys.exit(f"error: {usage}")
    stage, argv = argv[0], argv[1:]
    defaults, demo = (REWARD, REWARD_DEMO) if stage == "reward" else (PPO, PPO_DEMO)
    parser = cli.training_parser(__doc__, defaults, demo)
    parser.prog = f"rlhf.py {stage}"
    if stage == "ppo":
        parser.add_argument("--reward", help="the reward model, from `rlhf.py reward` (default: out/reward; "
                            "out/demo/reward with --demo)")
        parser.add_argument("--oracle", action="store_true", help="PPO-GT: optimize the toy task's true reward")
        parser.add_argument("--kl_coef", type=cli.not_negative, default=0.1, help="beta of the per-token KL penalty")
        parser.add_argument("--value_lr", type=cli.positive, default=1e-4, help="the value model's learning rate")
        parser.add_argument("--ppo_epochs", type=cli.at_least(1), default=2, help="passes over each batch of rollouts")
        parser.add_argument("--minibatches", type=cli.at_least(1), default=2, help="minibatches a pass")
        parser.add_argument("--clip", type=cli.positive, default=0.2, help="PPO's clip range epsilon")
        parser.add_argument("--gamma", type=cli.fraction(0, 1, True), default=1.0, help="GAE's discount")
        parser.add_argument("--lam", type=cli.fraction(0, 1, True), default=0.95, help="GAE's lambda")
        parser.add_argument("--max_new_tokens", type=cli.at_least(1), help="tokens a rollout, at most (default: "
                            "128; 32 with --demo)")
        parser.add_argument("--eval_prompts", type=cli.at_least(1), default=64, help="held-out prompts an evaluation")
    args = cli.parse(parser, demo, argv)
    args.stage = stage
    name = stage + ("-oracle" if getattr(args, "oracle", False) else "")
    args.out_dir = args.out_dir or cli.default_out_dir(parser, args, name, ("oracle",))
    if stage == "ppo":
        args.max_new_tokens = args.max_new_tokens or (32 if args.demo else 128)
        args.reward = args.reward or ("out/demo/reward" if args.demo else "out/reward")
        if args.oracle and args.data != "toy":
            parser.error("--oracle needs the toy task's true reward: --data toy")
        if args.batch_size % args.minibatches:
            parser.error(f"--batch_size {args.batch_size} must be a multiple of --minibatches {args.minibatches}")
        if args.max_new_tokens >= args.max_len:
            parser.error(f"--max_new_tokens {args.max_new_tokens} leaves no room for a prompt in --max_len {args.max_len}")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        sys.exit("error: rlhf.py runs on one process; torchrun is for sft.py and dpo.py")
    if args.stage == "reward":
        with Run(args, "reward", ()) as run:
            train_reward(args, run)
    else:
        models = {"--init": args.init} if args.oracle else {"--init": args.init, "--reward": args.reward}
        with Run(args, "ppo", PPO_EXPERIMENT, models) as run:
            train_ppo(args, run)


if __name__ == "__main__":
    main()
