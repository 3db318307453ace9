"""benchmarks/memory.py: the computed memory of a DPO step, against a hand count and against what autograd
really keeps, and the table of which GPT-2 fits which card."""
import contextlib

import pytest
import torch

from benchmarks import bench, memory
from data import dpo_batch
from machinery.fast import use_chunked_head
from model import GPT, GPT2_SIZES, GPTConfig


def test_parameter_count_by_hand_and_against_the_model():
    assert memory.parameter_count(GPTConfig(**GPT2_SIZES["gpt2"])) == 124_439_808  # the published count
    tiny = GPTConfig(block_size=16, vocab_size=50, n_layer=3, n_head=2, n_embd=8)
    assert memory.parameter_count(tiny) == sum(p.numel() for p in GPT(tiny).parameters())


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("grad_checkpoint", [False, True])
@pytest.mark.parametrize("chunked_head", [False, True], ids=["plain_head", "chunked_head"])
def test_activation_bytes_equal_what_autograd_keeps(precision, grad_checkpoint, chunked_head):
    """The activation term of the memory table, byte for byte against the tensors saved for backward (on
    a CPU; bf16 through CPU autocast, whose casts are the GPU's: matmul inputs bf16, LayerNorm fp32)."""
    config = GPTConfig(block_size=64, vocab_size=300, n_layer=2, n_head=4, n_embd=32)
    torch.manual_seed(0)
    model = GPT(config)
    model.grad_checkpoint = grad_checkpoint
    if chunked_head:
        use_chunked_head(model)
    pairs = bench.synthetic_pairs(2, 24, 0.5, config.vocab_size)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bfloat16" else contextlib.nullcontext())
    measured = memory.saved_activation_bytes(model, dpo_batch(pairs), autocast)
    matmul_bytes = 2 if precision == "bfloat16" else 4
    computed = memory.activation_bytes(config, 4, 24, bench.counted_work(pairs, "stacked")[2], matmul_bytes, grad_checkpoint,
                                       chunked_head)
    if precision == "bfloat16" and not grad_checkpoint:
        computed += 2 * 12 * config.n_layer * config.n_embd ** 2  # autocast's bf16 weights, saved by the matmuls
    assert measured == computed


def test_memory_terms_of_gpt2_by_hand():
    """DPO, 8 pairs x 512 tokens, half of them response, reference live, bf16, fused AdamW, --chunked_head."""
    P, V, C = 124_439_808, 50257, 768
    tokens, labelled = 16 * 512, 16 * 256
    terms, peak = memory.memory_terms(GPTConfig(**GPT2_SIZES["gpt2"]), 8, 512, 0.5, chunked_head=True)
    assert terms["weights and AdamW moments"] == 16 * P - 4 * P
    assert terms["reference"] == 2 * P
    assert terms["bf16 weight copies"] == 2 * 12 * 12 * C * C  # 169,869,312
    per_token_per_block = 2 * 4 * C + 14 * 2 * C + 16 + 12 * 4  # 27,712
    activations = (12 * per_token_per_block * tokens + (8 + 4 * C + 8 + 1) * tokens + 8 * 512
                   + (4 * C + 8 + 4) * labelled)
    assert terms["activations"] == activations == 2_762_141_696
    assert 2**30 // (4 * V) > labelled  # 5,341 rows of logits per chunk: all 4,096 labelled rows in one
    forward = 2 * V * C + 8 * labelled * V  # bf16 head, fp32 logits and exp(logits - max)
    backward = 2 * V * C + 4 * V * C + max(6 * labelled * V, 2 * labelled * V + 2 * V * C + 4 * V * C)
    assert (terms["head scratch, forward"], terms["head scratch, backward"]) == (forward, backward)
    assert forward > backward  # all 4,096 rows in one chunk: the fp32 logits and their exp dominate
    assert terms["end of backward"] == max(4 * V * C + 4 * C * tokens, per_token_per_block * tokens + 16 * C * tokens)
    end_of_forward = 12 * P + 2 * P + 169_869_312 + activations + forward
    assert peak == end_of_forward  # activations dominate: more than the gradients that replace them
    assert peak / 2**30 == pytest.approx(5.96, abs=0.01)


def test_the_plain_head_of_gpt2_by_hand():
    """The same step with model.py's plain head: the (labelled x V) log-softmax is kept for backward, and its
    logits, their fp32 copy and its gradients exist whole."""
    P, V, C = 124_439_808, 50257, 768
    labelled = 16 * 256
    plain, plain_peak = memory.memory_terms(GPTConfig(**GPT2_SIZES["gpt2"]), 8, 512, 0.5)
    chunked, chunked_peak = memory.memory_terms(GPTConfig(**GPT2_SIZES["gpt2"]), 8, 512, 0.5, chunked_head=True)
    # kept for backward: the head's bf16 input and weight, the fp32 log-softmax and the targets, against the
    # chunked head's fp32 input, target and log-sum-exp
    assert plain["activations"] - chunked["activations"] == (2 * C + 4 * V + 8) * labelled + 2 * V * C - (4 * C + 12) * labelled
    assert plain["head scratch, forward"] == labelled * V * (2 + 4 + 4)  # the reference's logits, fp32 copy, log-softmax
    assert plain["head scratch, backward"] == 8 * labelled * V
    assert plain_peak - chunked_peak == pytest.approx(1.1 * 2**30, rel=0.05)  # about 1.1 GiB more


def test_memory_table_fits():
    table = {(row["model"], row["mode"]): row for row in memory.memory_table()}
    assert len(table) == 4 * len(memory.MEMORY_MODES)
    assert table["gpt2", "reference live"]["fits"] == [24, 40, 80]
    assert table["gpt2-xl", "reference live"]["fits"] == [80]
    assert table["gpt2-xl", "--grad_checkpoint"]["fits"] == [40, 80]
    for name in GPT2_SIZES:  # each flag lowers the peak
        live = table[name, "reference live"]["peak_gib"]
        assert table[name, "--precompute_ref"]["peak_gib"] < live
        assert table[name, "--grad_checkpoint"]["peak_gib"] < live


def test_the_table_prints_as_markdown(capsys):
    memory.main([])
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith("| gpt2")]
    assert len(rows) == 16 and all("computed" in row for row in rows)
