"""benchmarks/bench.py: the work and FLOPs it divides by (stacked and packed rows), and tiny runs of the
timed steps."""
import json

import pytest
import torch

from benchmarks import bench
from machinery.fast import packed_dpo_batch
from model import GPTConfig

# one pair by hand: a 4-token prompt, a 3-token chosen and a 2-token rejected response
PAIR = {"prompt": [1, 2, 3, 4], "chosen": [5, 6, 7], "rejected": [8, 9]}


def test_work_by_hand():
    # sft: one row of 4 + 3 - 1 = 6 tokens, causal: 1 + 2 + ... + 6 = 21 (query, key) pairs
    assert bench.counted_work([PAIR], "sft") == (6, 21, 3)
    # stacked: rows of 6 and 5 tokens: 21 + 15 pairs; 3 + 2 labels
    assert bench.counted_work([PAIR], "stacked") == (11, 36, 5)
    # packed: 4 + 2 + 1 tokens; the prompt 10 pairs, chosen's 2 tokens see 4 + 1 and 4 + 2, rejected's 1 sees 4 + 1
    assert bench.counted_work([PAIR], "packed") == (7, 10 + 11 + 5, 5)


def test_packed_work_counts_what_the_attention_mask_allows():
    """The packed count against the mask itself: k <= q, and k in the prompt or in q's own segment."""
    pairs = bench.synthetic_pairs(3, 20, 0.3, 100, seed=1)
    input_ids, labels, positions, attn_mask = packed_dpo_batch(pairs)
    real = (labels != -100).any(0) | (positions > 0) | (torch.arange(input_ids.size(1)) == 0)  # not padding
    allowed = attn_mask[:, 0] & real[:, :, None]  # padding queries are no work the model needs
    tokens, attended, labelled = bench.counted_work(pairs, "packed")
    assert attended == allowed.sum().item()
    assert tokens == real.sum().item()
    assert labelled == (labels != -100).sum().item()
    assert bench.counted_work(pairs, "stacked")[1] > attended  # the point of sharing the prompt


def test_pass_flops_by_hand():
    config = GPTConfig(n_layer=2, n_head=2, n_embd=8, vocab_size=100)
    blocks = 2 * 12 * 8 * 8  # 1,536 weights in the blocks' matmuls
    forward = 2 * blocks * 11 + 4 * 2 * 8 * 36 + 2 * 8 * 100 * 5  # the stacked PAIR: 33,792 + 2,304 + 8,000
    assert bench.pass_flops(config, 11, 36, 5, train=False) == forward == 44_096
    assert bench.pass_flops(config, 11, 36, 5) == 3 * forward  # backward is twice the forward


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


def test_bad_response_fraction_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--response_frac", "1.5"])
    assert exit_info.value.code != 0
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: --response_frac 1.5 must leave at least 2 response and 1 prompt tokens" in last_line
