"""bench.py: the FLOP count it divides by, and a tiny run that prints the table."""
import pytest

import bench
from model import GPTConfig


def test_step_flops_by_hand():
    config = GPTConfig(n_layer=2, n_head=2, n_embd=8, vocab_size=100)
    n = 2 * 12 * 8 * 8                      # non-embedding weights: 1,536
    per_token = 2 * n + 2 * 2 * 16 * 8      # forward at T = 16: 3,072 + 512
    forward = 3 * 16 * per_token + 20 * 2 * 8 * 100  # 3 rows of 16 tokens, 20 response tokens through the head
    assert bench.step_flops(config, 3, 16, 20, train=False) == forward
    assert bench.step_flops(config, 3, 16, 20) == 3 * forward  # backward is twice the forward


def test_tiny_bench_prints_both_steps(capsys):
    bench.main(["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--batch_size", "2", "--seq_len", "32",
                "--steps", "2", "--warmup", "1", "--device", "cpu", "--peak_tflops", "1"])
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
