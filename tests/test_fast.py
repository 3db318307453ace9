"""machinery/fast.py: each fast path gives the plain version's numbers. The chunked head (--chunked_head)
equals model.py's plain GPT.label_logps, values and gradients, and a copy of a model keeps its own head; packed
rows (dpo.py --share_prompt) equal data.dpo_batch's stacked rows."""
import copy
import os

import pytest
import torch

import dpo
import model
from conftest import HH_TEST
from data import dpo_batch, load_preferences, tokenize_pairs
from machinery import fast
from machinery.fast import packed_dpo_batch
from model import GPT, GPTConfig
from test_model import labels_for, random_tokens, tiny_gpt


@pytest.mark.parametrize("rows_per_chunk", [None, 3], ids=["default_chunks", "3_rows_per_chunk"])
def test_label_log_probs_equal_full_log_softmax(monkeypatch, rows_per_chunk):
    if rows_per_chunk is not None:
        # a budget of 3 rows of logits: the chunk loop runs several times and ends on a partial chunk
        monkeypatch.setattr(fast.LabelLogProbs, "BUDGET", {"cpu": rows_per_chunk * 4 * 64})
        assert fast.LabelLogProbs.rows_per_chunk(torch.empty(64, 32)) == rows_per_chunk
    gpt = tiny_gpt()
    chunked = fast.use_chunked_head(copy.deepcopy(gpt))
    idx = random_tokens(64, (3, 16), seed=4)
    labels = labels_for(idx, prompt_lengths=[3, 8, 1], lengths=[16, 12, 9])  # the last two rows padded
    # an arbitrary weighted sum as the loss, so every position's gradient counts, each differently
    weights = torch.randn(labels.shape, generator=torch.Generator().manual_seed(0))

    logps = chunked(idx, labels)
    (logps * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in chunked.named_parameters()}
    expected = gpt(idx, labels)  # model.py's plain head
    (expected * weights).sum().backward()

    assert logps.dtype == torch.float32 and logps.shape == labels.shape
    assert (logps[labels == model.IGNORE_INDEX] == 0).all()  # exactly zero, not merely small
    assert (logps[labels != model.IGNORE_INDEX] < 0).all()
    torch.testing.assert_close(logps, expected, atol=1e-5, rtol=1e-5)
    for name, p in gpt.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=f"gradient of {name}")


def test_a_copy_of_a_chunked_model_uses_its_own_head():
    # dpo.py copies the policy to make the reference: the copy's chunked head must read the copy's weights
    policy = fast.use_chunked_head(tiny_gpt())
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        policy.lm_head.weight.mul_(2)  # the policy moves; the reference must not see it
    idx = random_tokens(64, (2, 12), seed=1)
    labels = labels_for(idx, prompt_lengths=[2, 4], lengths=[12, 10])
    plain = copy.deepcopy(reference)
    del plain.label_logps  # back to the class's plain method
    torch.testing.assert_close(reference(idx, labels), plain(idx, labels), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(policy(idx, labels), reference(idx, labels))


def test_packed_rows_give_the_same_log_probs_and_gradients_as_stacked_rows():
    """--share_prompt: each prompt runs once, yet every log-prob and gradient is dpo_batch's."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=512, vocab_size=50257, n_layer=2, n_head=2, n_embd=16)).double()
    pairs = tokenize_pairs(load_preferences(os.path.dirname(HH_TEST), "test", verbose=False), 300, 150,
                           verbose=False)[:6]
    stacked, packed = dpo_batch(pairs), packed_dpo_batch(pairs)
    assert packed[0].numel() < 0.75 * stacked[0].numel()  # the point: far fewer tokens
    chosen, rejected = dpo.pair_logps(model, stacked)
    packed_chosen, packed_rejected = dpo.pair_logps(model, packed)
    torch.testing.assert_close(packed_chosen, chosen, atol=1e-10, rtol=0)
    torch.testing.assert_close(packed_rejected, rejected, atol=1e-10, rtol=0)
    grads = torch.autograd.grad(chosen.sum() - 2 * rejected.sum(), list(model.parameters()))
    packed_grads = torch.autograd.grad(packed_chosen.sum() - 2 * packed_rejected.sum(), list(model.parameters()))
    for a, b in zip(grads, packed_grads):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-8)
