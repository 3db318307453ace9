"""What only a CUDA GPU can check: bf16 autocast against fp32, the fp16 + GradScaler path, the bf16
reference, torch.compile, and activation checkpointing and packed rows on the GPU's kernels.

Every test here is marked `cuda` and skips on a machine without a GPU; `python -m pytest -m cuda tests`
runs them, and benchmarks/gpu_check.py does so first. Each test takes its device as a default argument
(pytest leaves those alone), so its body can also be tried on a CPU by calling it by hand.
"""
import argparse
import copy

import pytest
import torch

import dpo
import sft
from data import dpo_batch
from machinery.compute import init_compute
from machinery.fast import packed_dpo_batch
from model import GPT, IGNORE_INDEX, GPTConfig, param_groups
from rlhf import optimizer_steps

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 as the oracle means fp32 matmuls: TF32 (which init_compute turns on) is switched off here."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def small_gpt(device, seed=0):
    """2 layers x 128 with GPT-2's whole vocabulary (the head is where low precision hurts most), its
    weights roughened so activations are far from the near-uniform ones of a fresh init."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = GPT(GPTConfig(block_size=256, vocab_size=50257, n_layer=2, n_head=4, n_embd=128))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # loss ~11.5: beyond ln(50257), confidently wrong
    return model


def random_pairs(n=4, seed=0):
    """Tokenized pairs of random ids with prompts and responses of differing lengths (padding included)."""
    generator = torch.Generator().manual_seed(seed)

    def ids(n_tokens):
        return torch.randint(50257, (n_tokens,), generator=generator).tolist()
    return [{"prompt": ids(40 + 7 * i), "chosen": ids(20 + 5 * i), "rejected": ids(30 - 3 * i)} for i in range(n)]


def on(device, tensors):
    return [t.to(device) for t in tensors]


def sft_batch(device):
    input_ids, labels, *_ = on(device, dpo_batch(random_pairs()))
    return input_ids, labels, (labels != IGNORE_INDEX).sum()


def gradients(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


def test_bf16_autocast_loss_and_gradient_are_close_to_fp32(device="cuda"):
    model = small_gpt(device)
    input_ids, labels, n_tokens = sft_batch(device)
    loss = sft.sft_loss(model, input_ids, labels, n_tokens)
    loss.backward()
    exact = gradients(model)
    model.zero_grad(set_to_none=True)
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
        mixed_loss = sft.sft_loss(model, input_ids, labels, n_tokens)
    mixed_loss.backward()
    assert mixed_loss.dtype == torch.float32  # the head sums in fp32 whatever the matmuls' precision
    assert mixed_loss.item() == pytest.approx(loss.item(), rel=2e-3)
    assert cosine(gradients(model), exact) > 0.99


def test_fp16_with_grad_scaler_trains_and_skips_an_overflowing_step(device="cuda"):
    args = argparse.Namespace(device=device, dtype="float16")
    compute = init_compute(args)
    assert compute.scaler.is_enabled()  # fp16 needs loss scaling; bf16 and fp32 do not
    model = small_gpt(args.device)
    optimizer = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-3, betas=(0.9, 0.95), fused=True)
    input_ids, labels, n_tokens = sft_batch(args.device)

    def step(scale_loss_by=1.0):
        with compute.autocast:
            loss = sft.sft_loss(model, input_ids, labels, n_tokens)
        compute.scaler.scale(loss * scale_loss_by).backward()
        optimizer_steps(compute.scaler, [optimizer], [model], 1.0)  # unscale, clip, step, as sft.py and dpo.py do
        return loss.item()

    losses = [step() for _ in range(10)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5  # one batch, ten steps at lr 1e-3: it must be learning
    before = [p.detach().clone() for p in model.parameters()]
    scale = compute.scaler.get_scale()
    step(scale_loss_by=float("inf"))  # an overflow: the scaler must skip the update and back off
    assert compute.scaler.get_scale() < scale
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_bf16_reference_gives_rewards_near_zero_at_the_start(device="cuda"):
    """dpo.freeze casts the reference to bf16 on a GPU: half the memory, and its log-probs differ from
    the fp32 policy's only by rounding, so at step 0 the rewards are near 0 and the loss near ln 2."""
    policy = small_gpt(device)
    reference = dpo.freeze(copy.deepcopy(policy), device, "bfloat16")
    if torch.device(device).type == "cuda":
        assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in reference.parameters())
    batch = on(device, dpo_batch(random_pairs()))
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
        chosen, rejected = dpo.pair_logps(policy, batch)
        ref_chosen, ref_rejected = dpo.pair_logps(reference, batch)
    losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, 0.1)
    assert ref_chosen.dtype == torch.float32
    # beta 0.1 x the rounding of ~40-token sums (0.015 at most on a CPU's bf16)
    assert chosen_rewards.abs().max() < 0.1 and rejected_rewards.abs().max() < 0.1
    assert losses.mean().item() == pytest.approx(0.6931, abs=0.05)


@pytest.mark.parametrize("layout", ["stacked", "packed"])
def test_compiled_model_gives_the_eager_log_probs_and_gradients(layout, device="cuda"):
    eager = small_gpt(device)
    compiled = copy.deepcopy(eager)
    compiled.compile()
    batch = on(device, dpo_batch(random_pairs()) if layout == "stacked" else packed_dpo_batch(random_pairs()))
    for model in (eager, compiled):
        chosen, rejected = dpo.pair_logps(model, batch)
        (chosen.sum() - 2 * rejected.sum()).backward()
    torch.testing.assert_close(dpo.pair_logps(compiled, batch), dpo.pair_logps(eager, batch), atol=1e-3, rtol=1e-5)
    for a, b in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-3)


def test_grad_checkpoint_under_bf16_autocast_gives_the_same_gradients(device="cuda"):
    model = small_gpt(device)
    input_ids, labels, n_tokens = sft_batch(device)
    results = []
    for grad_checkpoint in (False, True):
        model.grad_checkpoint = grad_checkpoint
        model.zero_grad(set_to_none=True)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
            loss = sft.sft_loss(model, input_ids, labels, n_tokens)
        loss.backward()
        results.append((loss.item(), gradients(model)))
    (loss, plain), (checkpointed_loss, checkpointed) = results
    assert checkpointed_loss == pytest.approx(loss, rel=1e-6)
    assert (checkpointed - plain).norm() < 1e-3 * plain.norm()  # the same kernels again, up to atomics' order


def test_packed_rows_give_the_stacked_log_probs_on_the_gpu_kernels(device="cuda"):
    """The packed mask cannot use the flash kernel; whichever SDPA picks must still give dpo_batch's numbers."""
    model = small_gpt(device)
    pairs = random_pairs()
    stacked = on(device, dpo_batch(pairs))
    packed = on(device, packed_dpo_batch(pairs))
    torch.testing.assert_close(dpo.pair_logps(model, packed), dpo.pair_logps(model, stacked), atol=1e-3, rtol=1e-5)
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
        packed_chosen, _ = dpo.pair_logps(model, packed)
        stacked_chosen, _ = dpo.pair_logps(model, stacked)
    torch.testing.assert_close(packed_chosen, stacked_chosen, atol=0.1, rtol=1e-3)  # bf16 sums over ~40 tokens
