"""bench.py: the work and FLOPs it divides by (stacked and packed rows), the computed memory table
against a hand count and against what autograd really keeps, and tiny runs of the timed steps."""
import contextlib
import json

import pytest
import torch

import bench
from data import dpo_batch, packed_dpo_batch
from model import GPT, GPT2_SIZES, GPTConfig

# one pair by hand: a 4-token prompt, a 3-token chosen and a 2-token rejected response
PAIR = {"prompt": [1, 2, 3, 4], "chosen": [5, 6, 7], "rejected": [8, 9]}


def test_work_by_hand():
    # sft: one row of 4 + 3 - 1 = 6 tokens, causal: 1 + 2 + ... + 6 = 21 (query, key) pairs
    assert bench.work([PAIR], "sft") == (6, 21, 3)
    # stacked: rows of 6 and 5 tokens: 21 + 15 pairs; 3 + 2 labels
    assert bench.work([PAIR], "stacked") == (11, 36, 5)
    # packed: 4 + 2 + 1 tokens; the prompt 10 pairs, chosen's 2 tokens see 4 + 1 and 4 + 2, rejected's 1 sees 4 + 1
    assert bench.work([PAIR], "packed") == (7, 10 + 11 + 5, 5)


def test_packed_work_counts_what_the_attention_mask_allows():
    """The packed count against the mask itself: k <= q, and k in the prompt or in q's own segment."""
    pairs = bench.synthetic_pairs(3, 20, 0.3, 100, seed=1)
    input_ids, labels, positions, segments = packed_dpo_batch(pairs)
    query, key = segments[:, :, None], segments[:, None, :]
    causal = torch.ones(input_ids.size(1), input_ids.size(1), dtype=torch.bool).tril()
    allowed = causal & ((key == 0) | (key == query)) & (query != 3)  # segment 3: padding, no work needed
    tokens, attended, labelled = bench.work(pairs, "packed")
    assert attended == allowed.sum().item()
    assert tokens == (segments != 3).sum().item()
    assert labelled == (labels != -100).sum().item()
    assert bench.work(pairs, "stacked")[1] > attended  # the point of sharing the prompt


def test_pass_flops_by_hand():
    config = GPTConfig(n_layer=2, n_head=2, n_embd=8, vocab_size=100)
    blocks = 2 * 12 * 8 * 8  # 1,536 weights in the blocks' matmuls
    forward = 2 * blocks * 11 + 4 * 2 * 8 * 36 + 2 * 8 * 100 * 5  # the stacked PAIR: 33,792 + 2,304 + 8,000
    assert bench.pass_flops(config, 11, 36, 5, train=False) == forward == 44_096
    assert bench.pass_flops(config, 11, 36, 5) == 3 * forward  # backward is twice the forward


def test_parameter_count_by_hand_and_against_the_model():
    assert bench.parameter_count(GPTConfig(**GPT2_SIZES["gpt2"])) == 124_439_808  # the published count
    tiny = GPTConfig(block_size=16, vocab_size=50, n_layer=3, n_head=2, n_embd=8)
    assert bench.parameter_count(tiny) == GPT(tiny).num_params()


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("grad_checkpoint", [False, True])
def test_activation_bytes_equal_what_autograd_keeps(precision, grad_checkpoint):
    """The activation term of the memory table, byte for byte against the tensors saved for backward (on
    a CPU; bf16 through CPU autocast, whose casts are the GPU's: matmul inputs bf16, LayerNorm fp32)."""
    config = GPTConfig(block_size=64, vocab_size=300, n_layer=2, n_head=4, n_embd=32)
    torch.manual_seed(0)
    model = GPT(config)
    model.grad_checkpoint = grad_checkpoint
    pairs = bench.synthetic_pairs(2, 24, 0.5, config.vocab_size)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bfloat16" else contextlib.nullcontext())
    measured = bench.saved_activation_bytes(model, dpo_batch(pairs), autocast)
    matmul_bytes = 2 if precision == "bfloat16" else 4
    computed = bench.activation_bytes(config, 4, 24, bench.work(pairs, "stacked")[2], matmul_bytes, grad_checkpoint)
    if precision == "bfloat16" and not grad_checkpoint:
        computed += 2 * 12 * config.n_layer * config.n_embd ** 2  # autocast's bf16 weights, saved by the matmuls
    assert measured == computed


def test_memory_terms_of_gpt2_by_hand():
    """DPO, 8 pairs x 512 tokens, half of them response, reference live, bf16, fused AdamW."""
    P, V, C = 124_439_808, 50257, 768
    tokens, labelled = 16 * 512, 16 * 256
    terms, peak = bench.memory_terms(GPTConfig(**GPT2_SIZES["gpt2"]), 8, 512, 0.5)
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


def test_memory_table_fits():
    table = {(row["model"], row["mode"]): row for row in bench.memory_table()}
    assert len(table) == 4 * len(bench.MEMORY_MODES)
    assert table["gpt2", "reference live"]["fits"] == [24, 40, 80]
    assert table["gpt2-xl", "reference live"]["fits"] == [80]
    assert table["gpt2-xl", "--grad_checkpoint"]["fits"] == [40, 80]
    for name in GPT2_SIZES:  # each flag lowers the peak
        live = table[name, "reference live"]["peak_gib"]
        assert table[name, "--precompute_ref"]["peak_gib"] < live
        assert table[name, "--grad_checkpoint"]["peak_gib"] < live


TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--batch_size", "2", "--seq_len", "32",
        "--steps", "1", "--warmup", "0", "--device", "cpu", "--peak_tflops", "1"]


def test_tiny_bench_prints_both_steps(capsys):
    bench.main(TINY)
    out = capsys.readouterr().out
    assert "sft" in out and "dpo" in out and "MFU" in out
    lines = [line.split() for line in out.splitlines() if line.startswith(("sft", "dpo"))]
    assert [line[0] for line in lines] == ["sft", "dpo"]
    for line in lines:
        milliseconds, tokens_per_s = float(line[1]), float(line[2])
        assert milliseconds > 0
        # tokens/s is the batch's tokens over the step time: 2 rows (SFT) or 2 pairs = 4 rows (DPO) of 32
        rows_in_step = 2 if line[0] == "sft" else 4
        assert tokens_per_s == pytest.approx(rows_in_step * 32 / (milliseconds / 1000), rel=0.05)  # ms is printed to 0.1


def test_share_prompt_counts_less_work_for_the_same_pairs(tmp_path, capsys):
    stacked = bench.run(bench.parse_args(TINY + ["--only", "dpo"]))["steps"][0]
    path = tmp_path / "packed.json"
    packed_result = bench.run(bench.parse_args(TINY + ["--only", "dpo", "--share_prompt", "--grad_checkpoint",
                                                       "--json", str(path)]))
    assert json.loads(path.read_text()) == json.loads(json.dumps(packed_result))
    packed = packed_result["steps"][0]
    # 2 pairs of a 17-token prompt and two 16-token responses: 64 stacked tokens a pair, 17 + 15 + 15 packed
    assert (stacked["model_tokens"], packed["model_tokens"]) == (128, 94)
    assert packed["labelled"] == stacked["labelled"] == 64
    assert packed["flops"] < stacked["flops"]
    for step in (stacked, packed):  # tokens/s counts the pairs' stacked tokens in both layouts
        assert step["tokens_per_s"] == pytest.approx(128 / (step["ms"] / 1000))
        assert step["mfu"] == pytest.approx(step["flops"] / (step["ms"] / 1000) / 1e12)  # peak 1 TFLOP/s


def test_memory_table_flag_prints_markdown(capsys):
    bench.main(["--memory_table"])
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith("| gpt2")]
    assert len(rows) == 16 and all("computed" in row for row in rows)


def test_bad_response_fraction_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--response_frac", "1.5"])
    assert exit_info.value.code != 0
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: --response_frac 1.5 must leave at least 2 response and 1 prompt tokens" in last_line
