"""machinery/runlog.py and machinery/run.py: a broken model is never saved, by construction; the runaway
warning; Ctrl-C and SIGTERM at any time; log.jsonl read back whatever a crash left in it.

The runs are tiny (a 1-layer model, 60 toy pairs, a few steps): what they check is what reaches OUT_DIR.
"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import dpo
import sft
from conftest import ROOT, SMALL, copy_of, read_log, refused, sft_run
from data import collate, load_preferences, sft_examples, tokenize_pairs
from machinery import UserError
from machinery.checkpoints import load_checkpoint, open_model
from machinery.compute import Compute
from machinery.runlog import UNIFORM_NLL, Health, RunLog, check_training_loss
from model import GPT, GPTConfig


def poison_eval(monkeypatch, after_evals, value):
    """From the (after_evals + 1)-th evaluation on, eval-mode log-probs become `value` per token."""
    real, seen = GPT.forward, {"evals": 0, "training": True}

    def forward(self, idx, labels=None, **kwargs):
        out = real(self, idx, labels, **kwargs)
        if labels is None or self.training:
            seen["training"] = True
            return out
        if seen["training"]:  # the first forward of a new evaluation
            seen["training"], seen["evals"] = False, seen["evals"] + 1
        return torch.where(labels != -100, torch.full_like(out, value), out) if seen["evals"] > after_evals else out

    monkeypatch.setattr(GPT, "forward", forward)


@pytest.mark.parametrize("value, message", [(float("nan"), "the held-out loss is nan at step 4"),
                                            (-1000.0, "at step 4 the model gives held-out text it learns to write 1000")])
def test_a_broken_eval_stops_the_run_and_keeps_the_last_good_checkpoint(pairs_file, tmp_path, capsys,
                                                                        monkeypatch, value, message):
    poison_eval(monkeypatch, after_evals=2, value=value)  # evals at steps 0 and 2 are fine, 4 is not
    line = refused(lambda: sft_run(tmp_path, pairs_file, "--max_iters", "6"), capsys)
    assert message in line
    assert f"the last checkpoint, step 2, which passed the health check, is kept in {tmp_path / 'ckpt.pt'}" in line
    assert load_checkpoint(tmp_path / "ckpt.pt")["iter"] == 2
    last = read_log(tmp_path, "test")[-1]
    assert last["iter"] == 4 and (math.isnan(last["ppl"]) or last["ppl"] == float("inf"))  # exp(1000): no crash


def test_a_broken_first_eval_says_no_checkpoint_exists(pairs_file, tmp_path, capsys, monkeypatch):
    poison_eval(monkeypatch, after_evals=0, value=float("nan"))
    line = refused(lambda: sft_run(tmp_path, pairs_file), capsys)
    assert "the held-out loss is nan at step 0" in line and "no checkpoint was saved" in line
    assert "before any update, so not the learning rate" in line  # the lr cannot be the cause at step 0
    assert not (tmp_path / "ckpt.pt").exists()


def test_a_crash_in_the_final_eval_still_saves_the_weights_once_they_pass_a_health_check(pairs_file, tmp_path,
                                                                                         capsys, monkeypatch):
    real = sft.evaluate

    def crash_at_the_end(model, examples, args, compute):
        if len(read_log(tmp_path, "train")) == 3:
            raise RuntimeError("the machine went down during the final eval")
        return real(model, examples, args, compute)

    monkeypatch.setattr(sft, "evaluate", crash_at_the_end)
    with pytest.raises(RuntimeError, match="went down"):
        sft_run(tmp_path, pairs_file, "--max_iters", "3", "--eval_interval", "0")
    assert load_checkpoint(tmp_path / "ckpt.pt")["iter"] == 3
    assert "the evaluation at step 3 failed; checking the weights on one held-out micro-batch" in capsys.readouterr().out


def test_dpo_diverging_at_a_huge_lr_stops_without_saving(pairs_file, tmp_path, capsys):
    line = refused(lambda: dpo.main(["--init", "scratch", "--data", pairs_file, "--out_dir", str(tmp_path),
                                     "--lr", "1e3", "--warmup", "1", "--max_iters", "10", "--eval_interval", "5",
                                     "--optimizer", "adamw"] + SMALL), capsys)
    assert "it has diverged" in line and "no checkpoint was saved" in line and "lower --lr" in line
    assert not (tmp_path / "ckpt.pt").exists()


def test_dpo_watchdog_warns_once_when_the_chosen_log_probs_fall_far(sft_dir, pairs_file, tmp_path, capsys,
                                                                   monkeypatch):
    real, evals = dpo.evaluate, []

    def falling(*args, **kwargs):  # the real metrics, with the chosen responses 2, 6, then 8 nats less likely
        metrics = real(*args, **kwargs)
        drop = [0.0, 2.0, 6.0, 8.0][len(evals)]
        metrics["rewards/chosen"], metrics["logps/chosen"] = -0.1 * drop, metrics["logps/chosen"] - drop
        evals.append(drop)
        return metrics

    monkeypatch.setattr(dpo, "evaluate", falling)
    dpo.main(["--init", str(sft_dir), "--data", pairs_file, "--out_dir", str(tmp_path), "--lr", "1e-4", "--warmup",
              "1", "--max_iters", "3", "--eval_interval", "1", "--optimizer", "adamw", "--beta", "0.1"] + SMALL)
    out = capsys.readouterr().out
    assert evals == [0.0, 2.0, 6.0, 8.0]
    assert out.count("warning: ") == 1 and "warning: at step 2 the policy gives the held-out chosen responses 6.0" in out
    assert "try a lower --lr or a higher --beta" in out
    assert load_checkpoint(tmp_path / "ckpt.pt")["iter"] == 3  # a warning, not a stop


@pytest.mark.parametrize("signals", [["SIGTERM"], ["SIGINT", "SIGINT"]], ids=["sigterm", "ctrl_c_twice"])
def test_sigterm_and_a_second_ctrl_c_save_and_exit_cleanly(pairs_file, tmp_path, signals):
    command = [sys.executable, os.path.join(ROOT, "sft.py"), "--init", "scratch", "--data", pairs_file,
               "--out_dir", str(tmp_path), "--max_iters", "100000", "--eval_interval", "0", "--lr", "1e-3"] + SMALL
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, deadline = tmp_path / "log.jsonl", time.time() + 120
    while not (log.exists() and log.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.1)
    for name in signals:
        process.send_signal(getattr(signal, name))
        time.sleep(0.05)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0 and "Traceback" not in stderr, stderr
    assert f"{signals[0]}: finishing this step, then evaluating, saving and stopping" in stdout
    assert "saved; continue with --resume" in stdout
    assert load_checkpoint(tmp_path / "ckpt.pt")["iter"] == len(read_log(tmp_path, "train"))
    assert not (tmp_path / "run.lock").exists()


def test_a_torn_last_log_line_is_dropped_with_a_notice(sft_dir, pairs_file, tmp_path, capsys):
    out_dir = copy_of(sft_dir, tmp_path)
    with open(out_dir / "log.jsonl", "a") as f:
        f.write('{"iter": 5, "split": "tra')  # a crash in the middle of a write
    sft_run(out_dir, pairs_file, "--resume", "--max_iters", "6", "--lr_decay_iters", "4")
    assert "is not a whole record (cut off by a crash?); dropped" in capsys.readouterr().out
    assert [r["iter"] for r in read_log(out_dir, "train")] == [1, 2, 3, 4, 5, 6]


def held_out_nll(out_dir, pairs_file):
    """The health check's number for the checkpoint in out_dir: nats per held-out response token."""
    model = open_model(str(out_dir)).eval()
    test = tokenize_pairs(load_preferences(pairs_file, "test", verbose=False), 64, 32, verbose=False)
    compute = Compute("cpu", "float32", __import__("contextlib").nullcontext(), None)
    return Health(collate(sft_examples(test, "chosen")), compute, model).nll_per_token(model)


def test_a_diverged_sft_model_is_never_saved(pairs_file, tmp_path, capsys):
    # the smallest reproduction of the old hole: one step at lr 1000, and no periodic eval to catch it
    line = refused(lambda: sft.main(["--demo", "--lr", "1e3", "--warmup", "1", "--max_iters", "1", "--eval_interval",
                                     "0", "--eval_batches", "1", "--batch_size", "4", "--out_dir", str(tmp_path)]
                                    + SMALL[:8]), capsys)
    assert ("it has diverged" in line or "is nan" in line) and "no checkpoint was saved" in line
    assert not (tmp_path / "ckpt.pt").exists()


def test_a_diverging_dpo_run_keeps_its_last_healthy_checkpoint(sft_dir, pairs_file, tmp_path, capsys):
    # lr 0.1: the eval at step 2 may pass, a later one fails; whatever is on disk passed the health check
    line = refused(lambda: dpo.main(["--init", str(sft_dir), "--data", pairs_file, "--out_dir", str(tmp_path),
                                     "--max_iters", "6", "--warmup", "1", "--lr", "1e-1", "--eval_interval", "2",
                                     "--optimizer", "adamw"] + SMALL), capsys)
    assert "it has diverged" in line or "is nan" in line
    if (tmp_path / "ckpt.pt").exists():
        step = load_checkpoint(tmp_path / "ckpt.pt")["iter"]
        assert f"the last checkpoint, step {step}, which passed the health check" in line and step < 6
        assert held_out_nll(tmp_path, pairs_file) <= UNIFORM_NLL
    else:
        assert "no checkpoint was saved" in line


def test_health_cut_is_a_uniform_guess_or_the_start_if_worse():
    compute = Compute("cpu", "float32", __import__("contextlib").nullcontext(), None)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16))
    ids = torch.randint(50257, (2, 8))
    labels = torch.cat([torch.full((2, 3), -100), ids[:, 4:], torch.full((2, 1), -100)], dim=1)
    health = Health((ids, labels), compute, model)
    assert health.cut == pytest.approx(health.nll_per_token(model) + 1)  # random weights: their start, plus a nat
    assert health.nll_per_token(model) == pytest.approx(UNIFORM_NLL, abs=0.05)  # which is about ln V
    health.check(model, 1, {"loss": 1.0}, "kept")  # as good as it started: passes
    with torch.no_grad():
        model.lm_head.weight.mul_(50)  # confident and wrong: far worse than a uniform guess
    with pytest.raises(UserError, match="worse than its start by over a nat"):
        health.check(model, 2, {"loss": 1.0}, "kept")
    trained = Health((ids, labels), compute, model)
    trained.cut = UNIFORM_NLL  # as for a run that starts from a trained model
    with pytest.raises(UserError, match="worse than a uniform guess \\(10.8\\)"):
        trained.check(model, 3, {"loss": 1.0}, "kept")


def test_a_training_loss_that_is_not_finite_stops_at_once():
    with pytest.raises(UserError, match="the training loss is nan at step 7.*or --dtype bfloat16"):
        check_training_loss(float("nan"), 7, "float16", "no checkpoint")
    with pytest.raises(UserError) as error:
        check_training_loss(float("inf"), 7, "bfloat16", "no checkpoint")
    assert "bfloat16" not in str(error.value)


def test_sigterm_during_a_huge_lr_step_saves_nothing_broken(pairs_file, tmp_path):
    # the signal-save is checked like every other: a step at lr 1000 is never written as "this step is saved"
    command = [sys.executable, os.path.join(ROOT, "sft.py"), "--init", "scratch", "--data", pairs_file,
               "--out_dir", str(tmp_path), "--max_iters", "100000", "--eval_interval", "0", "--lr", "1e3",
               "--warmup", "1"] + SMALL
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, deadline = tmp_path / "log.jsonl", time.time() + 120
    while not (log.exists() and log.read_text().count("\n") >= 1) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode != 0 and "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and "no checkpoint was saved" in stderr
    assert not (tmp_path / "ckpt.pt").exists() and not (tmp_path / "run.lock").exists()


def test_sigterm_before_the_loop_is_one_line_and_releases_the_lock(pairs_file, tmp_path, capsys, monkeypatch):
    real = sft.tokenized_splits

    def slow_data(*args, **kwargs):  # a SIGTERM while the data loads, as a scheduler might send one
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(sft, "tokenized_splits", slow_data)
    line = refused(lambda: sft_run(tmp_path, pairs_file), capsys)
    assert line == "SIGTERM before training started: stopped, no checkpoint was written"
    assert os.listdir(tmp_path) == []  # no lock, no log


def test_a_stop_at_an_eval_step_keeps_that_steps_eval_in_the_log(pairs_file, tmp_path, monkeypatch):
    # a signal after step 2, an eval step: the stop-save evaluates step 2, and --resume does not skip a record
    import machinery.runlog as runlog
    real = runlog.StopSignals.requested
    monkeypatch.setattr(runlog.StopSignals, "requested", lambda self: len(read_log(tmp_path, "train")) == 2 or real(self))
    sft_run(tmp_path, pairs_file, "--max_iters", "6", "--lr_decay_iters", "6")
    assert load_checkpoint(tmp_path / "ckpt.pt")["iter"] == 2
    monkeypatch.undo()
    sft_run(tmp_path, pairs_file, "--max_iters", "6", "--lr_decay_iters", "6", "--resume")
    assert [r["iter"] for r in read_log(tmp_path, "test")] == [0, 2, 4, 6]


def test_an_out_dir_deleted_mid_run_stops_with_one_line(pairs_file, tmp_path, capsys, monkeypatch):
    real = RunLog.__call__

    def vanishing(self, record):
        if record["split"] == "train" and record["iter"] == 2:
            shutil.rmtree(tmp_path / "run")
        return real(self, record)

    monkeypatch.setattr(RunLog, "__call__", vanishing)
    line = refused(lambda: sft_run(tmp_path / "run", pairs_file, "--max_iters", "6"), capsys)
    assert "cannot write" in line and "deleted" in line


def test_a_log_with_garbage_lines_resumes_with_a_notice_for_each(sft_dir, pairs_file, tmp_path, capsys):
    out_dir = copy_of(sft_dir, tmp_path)
    with open(out_dir / "log.jsonl", "ab") as f:
        f.write(b"{}\n\xff\xfe not text\n[1, 2]\n")
    sft_run(out_dir, pairs_file, "--resume", "--max_iters", "6", "--lr_decay_iters", "4")
    notes = [line for line in capsys.readouterr().out.splitlines() if "is not a whole record" in line]
    assert len(notes) == 3
    assert [r["iter"] for r in read_log(out_dir, "train")] == [1, 2, 3, 4, 5, 6]
