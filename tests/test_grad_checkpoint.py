"""GPT.grad_checkpoint: recomputing each block in backward changes no loss and no gradient, in the
stacked and the packed (shared-prompt) layouts, and it is active only when a backward pass will follow."""
import contextlib

import pytest
import torch

from benchmarks import memory
from model import GPT, IGNORE_INDEX, GPTConfig


def tiny_model(dropout=0.0):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=32, vocab_size=97, n_layer=3, n_head=2, n_embd=16, dropout=dropout)).double()


def stacked_batch():
    """4 rows of 12 tokens, the first 5 positions prompt (no label)."""
    generator = torch.Generator().manual_seed(1)
    idx = torch.randint(97, (4, 12), generator=generator)
    labels = torch.randint(97, (4, 12), generator=generator)
    labels[:, :5] = IGNORE_INDEX
    return idx, labels


def packed_batch():
    """2 packed rows of 11 tokens: a 5-token prompt (segment 0), a 3-token chosen and a 3-token rejected
    response (segments 1, 2) whose positions both continue the prompt; labels (2, B, T), one plane each."""
    generator = torch.Generator().manual_seed(2)
    idx = torch.randint(97, (2, 11), generator=generator)
    positions = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 5, 6, 7]).repeat(2, 1)
    segments = torch.tensor([0] * 5 + [1] * 3 + [2] * 3)
    sees = (torch.ones(11, 11, dtype=torch.bool).tril() & ((segments[None, :] == 0) | (segments[None, :] == segments[:, None])))
    attn_mask = sees.expand(2, 1, 11, 11)  # a token sees the prompt and its own response
    labels = torch.full((2, 2, 11), IGNORE_INDEX)
    labels[0, :, 4:8] = torch.randint(97, (2, 4), generator=generator)  # chosen: from the prompt's last token
    labels[1, :, 4] = torch.randint(97, (2,), generator=generator)      # rejected: its first token ...
    labels[1, :, 8:11] = torch.randint(97, (2, 3), generator=generator)  # ... and the rest of it
    return idx, labels, positions, attn_mask


def loss_and_grads(model, batch, grad_checkpoint, seed=None):
    model.grad_checkpoint = grad_checkpoint
    model.zero_grad(set_to_none=True)
    if seed is not None:
        torch.manual_seed(seed)  # the same dropout masks for both runs
    loss = -model(*batch).sum()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("layout", ["stacked", "packed"])
def test_checkpointed_blocks_give_the_same_loss_and_gradients(layout):
    model = tiny_model()
    batch = stacked_batch() if layout == "stacked" else packed_batch()
    loss, grads = loss_and_grads(model, batch, grad_checkpoint=False)
    checkpointed_loss, checkpointed_grads = loss_and_grads(model, batch, grad_checkpoint=True)
    torch.testing.assert_close(checkpointed_loss, loss, atol=1e-12, rtol=0)
    assert len(checkpointed_grads) == len(grads)
    for checkpointed, plain in zip(checkpointed_grads, grads):
        torch.testing.assert_close(checkpointed, plain, atol=1e-12, rtol=1e-10)
    assert any(g.abs().max() > 0 for g in grads)  # a real gradient was compared, not zeros


def test_dropout_masks_are_replayed_in_the_recomputation():
    """With dropout on, the recomputed block must draw the masks of the first pass, or the gradient is
    that of another network."""
    model = tiny_model(dropout=0.2).train()
    loss, grads = loss_and_grads(model, stacked_batch(), grad_checkpoint=False, seed=7)
    checkpointed_loss, checkpointed_grads = loss_and_grads(model, stacked_batch(), grad_checkpoint=True, seed=7)
    _, other_masks = loss_and_grads(model, stacked_batch(), grad_checkpoint=True, seed=8)
    torch.testing.assert_close(checkpointed_loss, loss, atol=1e-12, rtol=0)
    for checkpointed, plain in zip(checkpointed_grads, grads):
        torch.testing.assert_close(checkpointed, plain, atol=1e-12, rtol=1e-10)
    assert not torch.allclose(other_masks[0], grads[0])  # dropout does change the gradient: the test can fail


def saved_bytes(model, batch):
    """Bytes of the distinct storages autograd keeps for backward (the weights excluded): benchmarks/memory.py's count."""
    return memory.saved_activation_bytes(model, batch, contextlib.nullcontext())


def test_checkpointing_keeps_less_and_only_while_training():
    model = tiny_model()
    batch = stacked_batch()
    model.grad_checkpoint = False
    plain = saved_bytes(model, batch)
    model.grad_checkpoint = True
    checkpointed = saved_bytes(model, batch)
    assert checkpointed < plain / 3  # the blocks' inputs only, not their insides
    model.eval()
    assert saved_bytes(model, batch) == plain  # in eval the flag is ignored: nothing would be recomputed
    with torch.no_grad():
        model.train()
        torch.testing.assert_close(model(*batch), tiny_model()(*batch), atol=0, rtol=0)  # no_grad: plain pass
