"""sft.py: the accumulation maths, exact resume, learning, and what a user sees on bad input."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import sft
from conftest import HH_TEST, TINY, read_log, run_script
from data import collate, sft_examples, toy_pairs, tokenize_pairs
from machinery.models import load_checkpoint, open_model
from model import GPT, GPTConfig, IGNORE_INDEX


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_accumulating_four_micro_batches_of_two_equals_one_batch_of_eight():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=16)).double()
    pairs = tokenize_pairs(toy_pairs("train")[:8], 64, 32, verbose=False)
    examples = sft_examples(pairs, "both")[:8]
    # make response lengths differ a lot, so a per-micro-batch mean would weigh tokens unequally
    examples = [(ids[:len(ids) - 3 * i], labels[:len(labels) - 3 * i]) for i, (ids, labels) in enumerate(examples)]
    full_ids, full_labels = collate(examples)
    n_tokens = (full_labels != IGNORE_INDEX).sum().item()

    sft.sft_loss(model, full_ids, full_labels, n_tokens).backward()
    one_batch = _grads(model)
    model.zero_grad()
    for m in range(4):
        ids, labels = collate(examples[2 * m:2 * m + 2])  # each micro-batch padded to its own longest
        sft.sft_loss(model, ids, labels, n_tokens).backward()
    torch.testing.assert_close(_grads(model), one_batch, atol=1e-6, rtol=0)

    # the bug this guards against: averaging each micro-batch's own mean gives a different gradient
    model.zero_grad()
    for m in range(4):
        ids, labels = collate(examples[2 * m:2 * m + 2])
        (sft.sft_loss(model, ids, labels, (labels != IGNORE_INDEX).sum().item()) / 4).backward()
    assert (_grads(model) - one_batch).abs().max() > 1e-4


def _run(out_dir, *extra):
    sft.main(["--demo", "--batch_size", "4", "--grad_accum", "2", "--lr_decay_iters", "6", "--warmup", "2",
              "--eval_interval", "0", "--eval_batches", "1", "--dropout", "0.1", "--out_dir", str(out_dir)]
             + TINY + list(extra))


def test_resume_continues_exactly_where_the_run_stopped(tmp_path):
    _run(tmp_path / "straight", "--max_iters", "6")
    _run(tmp_path / "resumed", "--max_iters", "3")
    _run(tmp_path / "resumed", "--max_iters", "6", "--resume")
    straight = [r["loss"] for r in read_log(tmp_path / "straight", "train")]
    resumed = [r["loss"] for r in read_log(tmp_path / "resumed", "train")]
    assert len(straight) == 6
    assert resumed == straight  # to the bit: same data order, dropout masks, optimizer state and lr
    assert load_checkpoint(tmp_path / "resumed" / "ckpt.pt")["iter"] == 6


def test_toy_sft_from_scratch_learns(toy_models):
    evals = read_log(toy_models["sft"], "test")  # the shared toy pipeline's SFT: 400 steps from scratch
    assert [e["iter"] for e in evals] == [0, 400]
    assert evals[0]["loss"] > 10  # ln(50257) = 10.8: a fresh model guesses uniformly
    assert evals[-1]["loss"] < 1.0  # the toy replies are nearly predictable: the floor is 0.19 per token
    train = read_log(toy_models["sft"], "train")
    assert all(k in train[0] for k in ("loss", "lr", "grad_norm", "dt_ms", "tokens_per_s"))


def test_sft_end_to_end_on_real_hh_pairs(tmp_path):
    result = run_script("sft.py", "--init", "scratch", "--data", os.path.dirname(HH_TEST), "--max_iters", "2",
                        "--batch_size", "2", "--max_len", "128", "--n_layer", "1", "--n_head", "2",
                        "--n_embd", "32", "--eval_batches", "2", "--device", "cpu", "--out_dir", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "kept 486 pairs" in result.stdout
    model = open_model(str(tmp_path))
    assert model.config.n_layer == 1 and model.config.n_embd == 32
    assert load_checkpoint(tmp_path / "ckpt.pt")["iter"] == 2


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real = GPT.forward
    calls = {"n": 0}

    def poisoned(self, idx, labels=None, **kwargs):
        calls["n"] += self.training  # count training forwards only
        out = real(self, idx, labels, **kwargs)
        return out * float("nan") if self.training and calls["n"] > 3 else out

    monkeypatch.setattr(GPT, "forward", poisoned)
    with pytest.raises(SystemExit) as exit_info:
        sft.main(["--demo", "--max_iters", "10", "--eval_interval", "2", "--eval_batches", "1",
                  "--batch_size", "4", "--out_dir", str(tmp_path)] + TINY)
    assert "the training loss is nan at step 4" in str(exit_info.value.code)  # as log.jsonl numbers it
    assert load_checkpoint(tmp_path / "ckpt.pt")["iter"] == 2  # saved at the step-2 eval, untouched since


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    command = [sys.executable, os.path.join(os.path.dirname(sft.__file__), "sft.py"), "--demo", "--max_iters",
               "100000", "--eval_interval", "0", "--out_dir", str(tmp_path)] + TINY
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and log.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    steps = len(read_log(tmp_path, "train"))
    assert load_checkpoint(tmp_path / "ckpt.pt")["iter"] == steps
    assert "continue with --resume" in stdout


@pytest.mark.parametrize("flags, message", [
    (["--init", "no/such/model"], "no model at --init no/such/model"),
    (["--data", "no/such/file.jsonl"], "data file no/such/file.jsonl does not exist"),
    (["--grad_accum", "0"], "--grad_accum: must be at least 1"),
    (["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
])
def test_bad_input_is_one_line_and_a_non_zero_exit(flags, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        sft.main(["--demo", "--max_iters", "1", "--out_dir", str(tmp_path / "x")] + TINY + flags)
    code, stderr = exit_info.value.code, capsys.readouterr().err
    shown = stderr + (code if isinstance(code, str) else "")
    assert code not in (0, None)
    assert message in shown and "Traceback" not in shown
    assert [line for line in shown.splitlines() if "error" in line] != []


def test_learning_rate_schedule_warms_up_then_decays_to_a_tenth():
    import argparse
    args = argparse.Namespace(lr=1.0, warmup=4, lr_decay_iters=10)
    assert [sft.get_lr(s, args) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]  # linear warmup
    assert sft.get_lr(4, args) == 1.0 and sft.get_lr(7, args) == pytest.approx(0.55)  # cosine midpoint
    assert sft.get_lr(10, args) == pytest.approx(0.1) and sft.get_lr(50, args) == pytest.approx(0.1)


def test_a_resumed_log_drops_the_records_after_the_checkpoint(tmp_path):
    from machinery.run import RunLog
    log = RunLog(tmp_path)
    for step in range(1, 6):
        log({"iter": step, "split": "train", "loss": 1.0})
    RunLog(tmp_path, start=3)  # steps 4 and 5 happened after the checkpoint: they will be done again
    assert [r["iter"] for r in read_log(tmp_path, "train")] == [1, 2, 3]


@pytest.mark.parametrize("flags, message", [
    (["--eval_batches", "0"], "--eval_batches: must be at least 1"),
    (["--init", "scratch", "--n_embd", "30", "--n_head", "4"], "must be a multiple of --n_head"),
])
def test_more_bad_flags(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sft.main(["--demo", "--max_iters", "1", "--device", "cpu", "--out_dir", "x"] + flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
