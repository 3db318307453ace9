"""The fast paths, each opt-in by a flag: the same numbers as the lesson's plain code, with less memory or
fewer tokens. tests/test_fast.py proves each equal to the plain version, values and gradients.

- use_chunked_head (--chunked_head): GPT.label_logps computed chunk by chunk (LabelLogProbs), so the
  (tokens x vocabulary) logits never exist whole; docs/performance.md measures what it saves and costs.
- packed_dpo_batch (dpo.py --share_prompt): each pair as one row with its prompt once, where the lesson's
  data.dpo_batch stacks two rows that both hold it.
- precompute (dpo.py --precompute_ref): the reference scores every pair once, before training, so only the
  policy stays in memory.
"""
import types

import torch

from data import EOS
from model import IGNORE_INDEX


def use_chunked_head(model):
    """--chunked_head: model's label_logps (what GPT.forward(idx, labels) returns) becomes the chunked one.
    A bound method, so a copy of the model (copy.deepcopy, for DPO's reference) computes with its own head."""
    model.label_logps = types.MethodType(lambda self, x, labels: label_logps(x, self.lm_head.weight, labels), model)
    return model


def label_logps(x, weight, labels):
    """GPT.label_logps(x, labels) for the final hidden states x (B, T, C) and the head's weight (vocab, C);
    labels (B, T), or (2, B, T) for packed rows (packed_dpo_batch), where a position can serve both planes."""
    mask = labels != IGNORE_INDEX
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    hidden = x.expand(*labels.shape, x.size(-1))[mask]  # (N, C): the labelled positions only
    picked = LabelLogProbs.apply(hidden, weight, labels[mask], dtype)  # (N,)
    return torch.zeros(labels.shape, dtype=picked.dtype, device=picked.device).masked_scatter(mask, picked)


class LabelLogProbs(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[row, target] for N rows, chunk by chunk: GPT.label_logps, made lean.

    GPT.label_logps keeps the (N, vocab) logits, a log-softmax copy and their gradients alive at once: for a
    DPO micro-batch of 8 x 512 tokens on GPT-2 that is several GB of fp32. Here one chunk of logits
    exists at a time; backward recomputes it (one more matmul) and turns it into the gradient in place,
    using d log p / d logits = onehot(target) - softmax.
    """
    # fp32 logits in flight at once. On CPU, 32 MB stays under glibc's largest default mmap threshold, so a
    # freed chunk is reused instead of being returned to the OS and page-faulted back, even where
    # compute.keep_freed_memory has not raised that threshold (a training run does; docs/performance.md
    # has the measurement); on a GPU, bigger chunks keep the matmuls large.
    BUDGET = {"cpu": 2**25, "cuda": 2**30}

    @staticmethod
    def rows_per_chunk(weight):
        return max(1, LabelLogProbs.BUDGET.get(weight.device.type, 2**25) // (4 * weight.size(0)))

    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype):
        exact = torch.promote_types(dtype, torch.float32)  # fp32 for the sums (fp64 stays fp64)
        logps = torch.empty(len(targets), dtype=exact, device=hidden.device)
        lse = torch.empty_like(logps)
        w = weight.to(dtype)
        chunk = LabelLogProbs.rows_per_chunk(weight)
        for s in range(0, len(targets), chunk):
            e = s + chunk
            logits = (hidden[s:e].to(dtype) @ w.t()).to(exact)  # (chunk, vocab)
            lse[s:e] = torch.logsumexp(logits, dim=1)
            logps[s:e] = logits.gather(1, targets[s:e, None]).squeeze(1) - lse[s:e]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.dtype = dtype
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, targets, lse = ctx.saved_tensors
        w = weight.to(ctx.dtype)
        grad_hidden = torch.empty_like(hidden)
        exact = lse.dtype
        grad_weight = torch.zeros(weight.shape, dtype=exact, device=weight.device)
        chunk = LabelLogProbs.rows_per_chunk(weight)
        for s in range(0, len(targets), chunk):
            e = s + chunk
            h = hidden[s:e].to(ctx.dtype)
            grad = (h @ w.t()).to(exact).sub_(lse[s:e, None]).exp_()  # softmax, (chunk, vocab), in place
            grad[torch.arange(len(grad), device=grad.device), targets[s:e]] -= 1  # softmax - onehot
            grad = grad.mul_(-grad_logps[s:e, None]).to(ctx.dtype)  # chain rule: d loss / d logits
            grad_hidden[s:e] = grad @ w
            grad_weight += (grad.t() @ h).to(exact)
        return grad_hidden, grad_weight.to(weight.dtype), None, None


def packed_dpo_batch(tokenized):
    """Each pair as ONE sequence that holds its prompt once: prompt, chosen, rejected. dpo_batch runs
    every prompt twice, and prompts are often longer than responses (docs/performance.md measures HH),
    so this sends fewer tokens through the blocks.

    Returns input_ids (B, W), labels (2, B, W): the chosen plane then the rejected plane, positions
    (B, W) and the attention mask (B, 1, W, W). Each response continues the prompt's positions, and a
    token sees the prompt (segment 0) and its own response (1 chosen, 2 rejected), never the other
    response, so every log-prob equals dpo_batch's (tests/test_fast.py).

    The label shift is done here, not in data.inputs_and_labels(): the rejected response sits after the chosen one but
    continues the prompt, so one shift of the whole sequence would be wrong at the joins, and each
    plane's labels are laid out by hand. labels[t] is still the token that follows input_ids[t] in that
    response's own prompt + response; the prompt's last token predicts the first token of both
    responses, so it carries a label in both planes."""
    packed = []
    for t in tokenized:
        prompt, chosen, rejected = t["prompt"], t["chosen"], t["rejected"]
        p, c, r = len(prompt), len(chosen), len(rejected)
        ids = prompt + chosen[:-1] + rejected[:-1]
        positions = list(range(p + c - 1)) + list(range(p, p + r - 1))
        segments = [0] * p + [1] * (c - 1) + [2] * (r - 1)
        chosen_labels = [IGNORE_INDEX] * (p - 1) + chosen + [IGNORE_INDEX] * (r - 1)
        rejected_labels = [IGNORE_INDEX] * (p - 1) + rejected[:1] + [IGNORE_INDEX] * (c - 1) + rejected[1:]
        packed.append((ids, chosen_labels, rejected_labels, positions, segments))
    width = max(len(ids) for ids, *_ in packed)
    input_ids = torch.full((len(packed), width), EOS, dtype=torch.long)
    labels = torch.full((2, len(packed), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(packed), width), dtype=torch.long)
    segments = torch.full((len(packed), width), 3, dtype=torch.long)  # padding: a segment of its own
    for b, (ids, chosen_labels, rejected_labels, pos, seg) in enumerate(packed):
        input_ids[b, :len(ids)] = torch.tensor(ids)
        labels[0, b, :len(ids)] = torch.tensor(chosen_labels)
        labels[1, b, :len(ids)] = torch.tensor(rejected_labels)
        positions[b, :len(ids)] = torch.tensor(pos)
        segments[b, :len(ids)] = torch.tensor(seg)
    query, key = segments[:, :, None], segments[:, None, :]  # (B, W, 1), (B, 1, W)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    attn_mask = (causal & ((key == 0) | (key == query)))[:, None]  # (B, 1, W, W): one for all heads
    return input_ids, labels, positions, attn_mask


@torch.no_grad()
def precompute(reference, pairs, make_batch, pair_logps, args, compute):
    """(N, 2) reference log-probs of every pair (chosen, rejected), in micro-batches of make_batch(pairs,
    indices, args). Under torchrun each process fills every world_size-th micro-batch's rows and the
    processes add up their tables."""
    logps = torch.zeros(len(pairs), 2, device=args.device)
    starts = range(0, len(pairs), args.batch_size)
    for start in starts[compute.rank::compute.world_size]:
        end = min(start + args.batch_size, len(pairs))
        with compute.autocast:
            logps[start:end] = torch.stack(pair_logps(reference, make_batch(pairs, range(start, end), args)), 1).float()
    return compute.all_reduce_sum(logps).cpu()
