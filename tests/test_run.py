"""machinery/run.py: a user's saved runs are never lost by an ordinary mistake, checkpoints are plain and
atomic, --resume continues the same experiment (same flags, data and reference) or says what changed; a broken
model is never saved, by construction; the runaway warning; Ctrl-C and SIGTERM at any time; log.jsonl read back
whatever a crash left in it.

The runs here are tiny (a 1-layer model, 60 toy pairs, a few steps), so each case costs about a second;
what they check is what happens to OUT_DIR, not what the model learns.
"""
import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

import dpo
import sft
from conftest import (ROOT, SMALL, copy_of, make_hf_gpt2, one_line_user_error, read_log, refused, sft_run,
                      snapshot)
from data import collate, load_preferences, sft_examples, toy_pairs, tokenize_pairs
from machinery import UserError, run
from machinery.compute import Compute
from machinery.models import load_checkpoint, load_weights, open_model
from machinery.run import UNIFORM_NLL, HealthCheck, RunLog, StopSignals, check_losses, save_checkpoint
from model import GPT, GPTConfig, param_groups
from test_model import random_tokens, tiny_gpt


# ----------------------------------------------------------------------------------------------------
# Checkpoints

def trained_for_one_step():
    """A tiny model and an AdamW that has taken one step, so the optimizer has state to save."""
    gpt = tiny_gpt(rough=False)
    optimizer = torch.optim.AdamW(param_groups(gpt, 0.1), lr=1e-3, betas=(0.9, 0.95))
    idx = random_tokens(64, (2, 8))
    F.cross_entropy(gpt(idx)[:, :-1].reshape(-1, 64), idx[:, 1:].reshape(-1)).backward()
    optimizer.step()
    return gpt, optimizer


def test_checkpoint_has_plain_types_only(tmp_path):
    gpt, optimizer = trained_for_one_step()
    args = argparse.Namespace(lr=1e-3, data="toy", compile=False, out_dir=str(tmp_path), betas=[0.9, 0.95])
    rng_at_save = torch.get_rng_state()
    save_checkpoint(str(tmp_path), gpt, optimizer, None, 7, args)

    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # fails if any class was pickled
    assert {"model", "config", "optimizer", "iter", "args", "rng"} <= set(checkpoint)
    assert type(checkpoint["config"]) is dict and checkpoint["config"] == asdict(gpt.config)
    assert checkpoint["iter"] == 7
    assert checkpoint["args"]["lr"] == 1e-3 and checkpoint["args"]["data"] == "toy"
    assert torch.equal(checkpoint["rng"]["cpu"], rng_at_save)
    assert checkpoint["optimizer"]["state"]  # AdamW's moments, not just the hyperparameters
    for key, tensor in gpt.state_dict().items():
        assert torch.equal(checkpoint["model"][key], tensor), key

    # and a checkpoint directory is a model to load, to the same logits
    restored = open_model(str(tmp_path))
    idx = random_tokens(64, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(restored(idx), gpt(idx), atol=0, rtol=0)


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    gpt, optimizer = trained_for_one_step()
    args = argparse.Namespace(lr=1e-3)
    save_checkpoint(str(tmp_path), gpt, optimizer, None, 1, args)

    written_to = []

    def crash_midway(obj, path, *rest, **kwargs):
        """torch.save that dies after writing part of the file, like a full disk or a killed job."""
        written_to.append(str(path))
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(run.torch, "save", crash_midway)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(str(tmp_path), gpt, optimizer, None, 2, args)
    monkeypatch.undo()

    assert written_to and written_to[0] != str(tmp_path / "ckpt.pt")  # the partial bytes went elsewhere
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no .tmp left behind


# ----------------------------------------------------------------------------------------------------
# Bad input: one clear line, not a traceback



def test_state_of_another_shape_names_the_key_and_both_shapes():
    gpt = tiny_gpt(rough=False)
    before = {k: v.clone() for k, v in gpt.state_dict().items()}

    bigger_vocab = tiny_gpt(rough=False, vocab_size=65).state_dict()
    message = one_line_user_error(lambda: load_weights(gpt, bigger_vocab, where="ckpt.pt"))
    assert "ckpt.pt" in message and "transformer.wte.weight" in message  # the first mismatch, in order
    assert "(65, 32)" in message and "(64, 32)" in message

    one_layer_off = dict(gpt.state_dict())
    one_layer_off["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(100, 32)
    message = one_line_user_error(lambda: load_weights(gpt, one_layer_off))
    assert "transformer.h.1.mlp.c_fc.weight" in message and "(100, 32)" in message and "(128, 32)" in message

    for key, tensor in gpt.state_dict().items():  # a refused state leaves the model as it was
        assert torch.equal(tensor, before[key]), key


def test_a_new_run_into_a_saved_one_refuses_and_touches_nothing(sft_dir, pairs_file, tmp_path, capsys):
    out_dir = copy_of(sft_dir, tmp_path)
    before = snapshot(out_dir)
    line = refused(lambda: sft_run(out_dir, pairs_file, "--max_iters", "2"), capsys)
    assert f"{out_dir} holds a run at step 4: pass --resume to continue it" in line
    assert snapshot(out_dir) == before
    assert not (out_dir / "run.lock").exists()


def test_overwrite_replaces_the_run_and_moves_the_old_one_aside_whole(sft_dir, pairs_file, tmp_path, capsys):
    out_dir = copy_of(sft_dir, tmp_path)
    before = snapshot(out_dir)
    sft_run(out_dir, pairs_file, "--max_iters", "2", "--overwrite")
    assert load_checkpoint(out_dir / "ckpt.pt")["iter"] == 2
    assert [r["iter"] for r in read_log(out_dir, "train")] == [1, 2]
    (aside,) = [p for p in out_dir.iterdir() if p.name.startswith("replaced-")]
    assert snapshot(aside) == before  # the old checkpoint and log, byte for byte
    assert f"--overwrite: the run at step 4 was moved to {aside}" in capsys.readouterr().out


def test_overwrite_that_fails_before_its_first_save_loses_nothing(sft_dir, pairs_file, tmp_path, capsys):
    # the new run diverges at its first checkpoint: the old run is whole in replaced-*/, and nothing of the
    # two is mixed in OUT_DIR, so --resume cannot splice the old checkpoint onto the failed run's log
    out_dir = copy_of(sft_dir, tmp_path)
    before = snapshot(out_dir)
    line = refused(lambda: sft_run(out_dir, pairs_file, "--overwrite", "--lr", "1e3", "--max_iters", "8"), capsys)
    assert "diverged" in line or "is nan" in line
    (aside,) = [p for p in out_dir.iterdir() if p.name.startswith("replaced-")]
    assert snapshot(aside) == before
    assert not (out_dir / "ckpt.pt").exists()
    line = refused(lambda: sft_run(out_dir, pairs_file, "--resume", "--max_iters", "8"), capsys)
    assert "holds no ckpt.pt to continue" in line


@pytest.mark.parametrize("flag", ["--out_dir", "--ref"])
def test_dpo_refuses_to_write_over_its_init_or_ref(sft_dir, pairs_file, tmp_path, capsys, flag):
    out_dir = copy_of(sft_dir, tmp_path)
    before = snapshot(out_dir)
    if flag == "--out_dir":  # --out_dir equal to --init
        argv = ["--init", str(out_dir), "--out_dir", str(out_dir)]
    else:  # --out_dir equal to --ref
        argv = ["--init", str(sft_dir), "--ref", str(out_dir), "--out_dir", str(out_dir)]
    line = refused(lambda: dpo.main(argv + ["--data", pairs_file] + SMALL), capsys)
    assert "writing there would replace it" in line
    assert snapshot(out_dir) == before


def test_a_checkpoint_records_its_stage_and_resume_refuses_another_stage(sft_dir, pairs_file, tmp_path, capsys):
    dpo_dir = tmp_path / "dpo"
    dpo.main(["--init", str(sft_dir), "--data", pairs_file, "--out_dir", str(dpo_dir), "--max_iters", "1",
              "--eval_interval", "0", "--lr", "1e-4", "--warmup", "1", "--optimizer", "adamw"] + SMALL)
    assert load_checkpoint(dpo_dir / "ckpt.pt")["stage"] == "dpo"
    assert load_checkpoint(sft_dir / "ckpt.pt")["stage"] == "sft"
    line = refused(lambda: sft_run(dpo_dir, pairs_file, "--resume", "--max_iters", "8"), capsys)
    assert "was written by dpo.py: resume it with dpo.py" in line
    # a DPO run as --init: its reference would silently be that DPO policy, not the SFT model
    line = refused(lambda: dpo.main(["--init", str(dpo_dir), "--data", pairs_file, "--out_dir",
                                     str(tmp_path / "again")] + SMALL), capsys)
    assert "is a DPO run: pass --ref too, the SFT model it was trained from" in line
    dpo.parse_args(["--init", str(dpo_dir), "--ref", str(sft_dir), "--out_dir", str(tmp_path / "again")])


def test_a_second_run_into_a_busy_out_dir_refuses_and_a_stale_lock_is_taken_over(pairs_file, tmp_path, capsys):
    out_dir = tmp_path / "busy"
    out_dir.mkdir()
    (out_dir / "run.lock").write_text(f"{os.getpid()} {os.uname().nodename}\n")  # this process: alive
    line = refused(lambda: sft_run(out_dir, pairs_file), capsys)
    assert f"in use by another run (PID {os.getpid()})" in line
    assert os.listdir(out_dir) == ["run.lock"]  # the other run's lock is left alone

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    (out_dir / "run.lock").write_text(f"{ended.pid} {os.uname().nodename}\n")
    sft_run(out_dir, pairs_file, "--max_iters", "1")
    assert "was left by a run that has ended" in capsys.readouterr().out
    assert sorted(os.listdir(out_dir)) == ["ckpt.pt", "log.jsonl"]  # our own lock is gone at the end


def test_a_failure_after_the_checks_writes_nothing(sft_dir, pairs_file, tmp_path, capsys):
    new_dir = tmp_path / "new"
    line = refused(lambda: sft_run(new_dir, pairs_file, "--batch_size", "1000"), capsys)
    assert "--batch_size 1000 is larger than the" in line
    assert not new_dir.exists()  # not even an empty directory

    out_dir = copy_of(sft_dir, tmp_path)  # --resume whose data can no longer serve a batch
    before = snapshot(out_dir)
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps(pair) + "\n" for pair in toy_pairs("train")[:5]))
    line = refused(lambda: sft.main(["--init", "scratch", "--data", str(small), "--out_dir", str(out_dir),
                                     "--max_iters", "8", "--eval_interval", "2", "--lr", "1e-3", "--warmup", "1",
                                     "--lr_decay_iters", "4", "--resume"] + SMALL), capsys)
    assert "--data" in line  # the data path changed: refused before anything else
    assert snapshot(out_dir) == before


def test_a_full_disk_while_saving_keeps_the_old_checkpoint(sft_dir, pairs_file, tmp_path, capsys, monkeypatch):
    out_dir = copy_of(sft_dir, tmp_path)
    before = (out_dir / "ckpt.pt").read_bytes()

    def full_disk(obj, path, *rest, **kwargs):  # as torch.save fails on a full disk: a RuntimeError
        with open(path, "wb") as f:
            f.write(b"PK half")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0: No space left on device")

    monkeypatch.setattr(run.torch, "save", full_disk)
    line = refused(lambda: sft_run(out_dir, pairs_file, "--resume", "--max_iters", "6", "--lr_decay_iters", "4"),
                   capsys)
    assert "could not write the step-6 checkpoint" in line and "No space left on device" in line
    assert re.search(r"it needs about \d+ MB, \d+ MB are free", line)
    assert "the last checkpoint, step 4, which passed the health check, is kept" in line
    assert (out_dir / "ckpt.pt").read_bytes() == before
    assert not [p for p in out_dir.iterdir() if p.name.endswith(".tmp")]  # no half-written file left


def test_resume_lists_every_flag_that_differs_and_allows_the_rest(sft_dir, pairs_file, tmp_path, capsys):
    out_dir = copy_of(sft_dir, tmp_path)
    line = refused(lambda: sft_run(out_dir, pairs_file, "--resume", "--max_iters", "6", "--lr_decay_iters", "4",
                                   "--lr", "5e-4", "--seed", "7"), capsys)
    assert "--lr: 0.001 in the checkpoint, 0.0005 now" in line and "--seed: 1337 in the checkpoint, 7 now" in line
    line = refused(lambda: sft_run(out_dir, pairs_file, "--resume", "--max_iters", "6"), capsys)
    assert "--lr_decay_iters: 4 in the checkpoint, 6 now" in line and "defaults to --max_iters" in line
    # what may change: max_iters upward, eval_interval, eval_batches
    sft_run(out_dir, pairs_file, "--resume", "--max_iters", "6", "--lr_decay_iters", "4", "--eval_interval", "3",
            "--eval_batches", "2")
    assert load_checkpoint(out_dir / "ckpt.pt")["iter"] == 6


def test_resume_with_max_iters_at_or_below_the_checkpoint_refuses(sft_dir, pairs_file, tmp_path, capsys):
    out_dir = copy_of(sft_dir, tmp_path)
    line = refused(lambda: sft_run(out_dir, pairs_file, "--resume", "--max_iters", "4"), capsys)
    assert "already at step 4" in line
    assert load_checkpoint(out_dir / "ckpt.pt")["iter"] == 4


@pytest.mark.parametrize("content, message", [
    (b"\x00\x01 random bytes \xff" * 10, "is not a readable checkpoint"),
    ("a dict without our keys", "is not a checkpoint of ours (no model, config, optimizer, iter, args, rng)"),
])
def test_a_checkpoint_that_is_not_ours_is_one_line(pairs_file, tmp_path, capsys, content, message):
    if isinstance(content, bytes):
        (tmp_path / "ckpt.pt").write_bytes(content)
    else:
        torch.save({"weights": torch.zeros(2)}, tmp_path / "ckpt.pt")
    line = refused(lambda: sft_run(tmp_path, pairs_file, "--resume"), capsys)
    assert message in line and "weights_only" not in line


def test_an_out_dir_that_cannot_be_written_is_one_line(pairs_file, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    assert "is a file; give a directory" in refused(lambda: sft_run(a_file, pairs_file), capsys)
    assert "cannot write to --out_dir" in refused(lambda: sft_run(a_file / "below", pairs_file), capsys)
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o555)
    if os.access(read_only, os.W_OK):  # root ignores permission bits: a read-only file system instead
        read_only = "/proc/nanodpo-test"
    assert "cannot write to --out_dir" in refused(lambda: sft_run(read_only, pairs_file), capsys)
    assert a_file.read_text() == "not a directory"


def test_grad_checkpoint_trains_the_same_and_may_change_on_resume(sft_dir, pairs_file, tmp_path, monkeypatch):
    import model
    recomputed = []

    def counting_checkpoint(*args, **kwargs):  # the flag must reach the model, not only the parser
        recomputed.append(1)
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)
    monkeypatch.setattr(model, "checkpoint", counting_checkpoint)
    out_dir = tmp_path / "recomputed"
    sft_run(out_dir, pairs_file, "--grad_checkpoint")
    assert len(recomputed) == 4 * 8 * 1  # 4 steps x 8 micro-batches x 1 block; none in the evals
    for split in ("train", "test"):
        losses, expected = read_log(out_dir, split), read_log(sft_dir, split)
        assert [r["iter"] for r in losses] == [r["iter"] for r in expected] and len(losses) >= 2
        assert [r["loss"] for r in losses] == pytest.approx([r["loss"] for r in expected], abs=1e-6)
    # it changes memory and speed, not the experiment: a resumed run may turn it on or off
    sft_run(out_dir, pairs_file, "--resume", "--max_iters", "6", "--lr_decay_iters", "4")
    assert load_checkpoint(out_dir / "ckpt.pt")["iter"] == 6


def dpo_run(out_dir, init, pairs_file, *extra):
    dpo.main(["--init", str(init), "--data", pairs_file, "--out_dir", str(out_dir), "--max_iters", "4",
              "--eval_interval", "2", "--lr", "1e-4", "--warmup", "1", "--optimizer", "adamw"] + SMALL + list(extra))


def test_resume_refuses_other_training_data(tmp_path, capsys):
    data_file, out_dir = tmp_path / "pairs.jsonl", tmp_path / "run"
    data_file.write_text("".join(json.dumps(pair) + "\n" for pair in toy_pairs("train")[:60]))
    sft_run(out_dir, str(data_file), "--lr_decay_iters", "4")
    # the same path, other contents: comparing the path alone would let the run go on
    data_file.write_text("".join(json.dumps(pair) + "\n" for pair in toy_pairs("train")[60:120]))
    line = refused(lambda: sft_run(out_dir, str(data_file), "--resume", "--max_iters", "6", "--lr_decay_iters", "4"),
                   capsys)
    assert f"--data {data_file} no longer gives the training pairs this run started with (as many pairs, other " \
           "tokens)" in line
    data_file.write_text("".join(json.dumps(pair) + "\n" for pair in toy_pairs("train")[:80]))
    line = refused(lambda: sft_run(out_dir, str(data_file), "--resume", "--max_iters", "6", "--lr_decay_iters", "4"),
                   capsys)
    assert "(57 pairs then, 76 now)" in line


def test_resume_refuses_other_held_out_data(tmp_path, capsys):
    # the test split decides what every evaluation and the health check see: an edited line is named
    data_file, out_dir = tmp_path / "pairs.jsonl", tmp_path / "run"
    pairs = toy_pairs("train")[:60]
    data_file.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    sft_run(out_dir, str(data_file), "--lr_decay_iters", "4")
    pairs[19] = {**pairs[19], "chosen": pairs[19]["chosen"] + " Really!"}  # every 20th pair is held out: this one
    data_file.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    line = refused(lambda: sft_run(out_dir, str(data_file), "--resume", "--max_iters", "6", "--lr_decay_iters", "4"),
                   capsys)
    assert f"--data {data_file} no longer gives the held-out pairs this run started with (as many pairs, other " \
           "tokens)" in line


def test_a_full_disk_before_the_first_write_is_one_line_and_leaves_no_folder(pairs_file, tmp_path, capsys,
                                                                            monkeypatch):
    real_fdopen = os.fdopen

    class FullDisk:  # the lock's file opens, but its few bytes do not fit
        def __init__(self, descriptor, mode):
            self.file = real_fdopen(descriptor, mode)

        def __enter__(self):
            return self

        def write(self, text):
            raise OSError(28, "No space left on device")

        def __exit__(self, *exc):
            self.file.close()

    monkeypatch.setattr(run.os, "fdopen", FullDisk)
    line = refused(lambda: sft_run(tmp_path / "new" / "run", pairs_file), capsys)
    assert "cannot write to --out_dir" in line and "No space left on device" in line and "free some space" in line
    assert not (tmp_path / "new").exists()  # the folders it made are gone again, the lock with them


def test_a_second_signal_after_a_signal_stop_cannot_change_the_exit(capsys):
    # the handlers stay until the process exits: a second SIGTERM after the save is reported, not fatal
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with StopSignals() as signals:
            signals.catch()
            os.kill(os.getpid(), signal.SIGTERM)
            assert signals.requested()
        os.kill(os.getpid(), signal.SIGTERM)  # after the stop, while the process is on its way out
        assert "SIGTERM: already stopping" in capsys.readouterr().out
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    with StopSignals():  # without a signal, the old handlers come back at the end
        pass
    assert signal.getsignal(signal.SIGTERM) == previous


def test_resume_refuses_a_reference_retrained_in_place(pairs_file, tmp_path, capsys):
    reference, run = tmp_path / "sft", tmp_path / "dpo"
    sft_run(reference, pairs_file, "--lr_decay_iters", "8")
    dpo_run(run, reference, pairs_file)
    sft_run(reference, pairs_file, "--lr_decay_iters", "8", "--max_iters", "8", "--resume")  # retrained in place
    line = refused(lambda: dpo_run(run, reference, pairs_file, "--max_iters", "6", "--resume"), capsys)
    assert f"the reference {reference} was at step 4 when this run started, it is at step 8 now" in line


def test_resume_through_a_symlink_is_the_same_run(sft_dir, pairs_file, tmp_path):
    run = tmp_path / "dpo"
    dpo_run(run, sft_dir, pairs_file)
    link = tmp_path / "link-to-sft"
    link.symlink_to(sft_dir)
    dpo_run(run, link, pairs_file, "--max_iters", "6", "--resume")  # the same --init, by another name
    assert load_checkpoint(run / "ckpt.pt")["iter"] == 6


def test_sft_refuses_an_init_that_names_nothing_before_writing(tmp_path, capsys):
    line = refused(lambda: sft.main(["--demo", "--init", "no/such/model", "--out_dir", str(tmp_path / "a" / "b")]),
                   capsys)
    assert "no model at --init no/such/model" in line
    assert not (tmp_path / "a").exists()  # not even the parent folders


def test_a_refused_demo_run_leaves_no_empty_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a fresh clone: no out/ yet
    line = refused(lambda: sft.main(["--demo", "--init", "no/such/model"]), capsys)
    assert "no model at --init no/such/model" in line and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------
# Nothing broken is saved; Ctrl-C and SIGTERM; log.jsonl

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


def test_a_log_that_is_a_directory_is_one_line_on_resume_and_the_checkpoint_stays(sft_dir, pairs_file, tmp_path, capsys):
    out_dir = copy_of(sft_dir, tmp_path)
    (out_dir / "log.jsonl").unlink()
    (out_dir / "log.jsonl").mkdir()
    before = (out_dir / "ckpt.pt").read_bytes()
    line = refused(lambda: sft_run(out_dir, pairs_file, "--resume", "--max_iters", "6", "--lr_decay_iters", "4"), capsys)
    assert "log.jsonl is a directory, not a run's log: move it away" in line
    assert (out_dir / "ckpt.pt").read_bytes() == before and (out_dir / "log.jsonl").is_dir()


def held_out_nll(out_dir, pairs_file):
    """The health check's number for the checkpoint in out_dir: nats per held-out response token."""
    model = open_model(str(out_dir)).eval()
    test = tokenize_pairs(load_preferences(pairs_file, "test", verbose=False), 64, 32, verbose=False)
    compute = Compute("cpu", "float32", contextlib.nullcontext(), None)
    return HealthCheck(collate(sft_examples(test, "chosen")), compute, model).nll_per_token()


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
    compute = Compute("cpu", "float32", contextlib.nullcontext(), None)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16))
    ids = torch.randint(50257, (2, 8))
    labels = torch.cat([torch.full((2, 3), -100), ids[:, 4:], torch.full((2, 1), -100)], dim=1)
    health = HealthCheck((ids, labels), compute, model)
    assert health.cut == pytest.approx(health.nll_per_token() + 1)  # random weights: their start, plus a nat
    assert health.nll_per_token() == pytest.approx(UNIFORM_NLL, abs=0.05)  # which is about ln V
    health.check(1, {"loss": 1.0}, "kept")  # as good as it started: passes
    with torch.no_grad():
        model.lm_head.weight.mul_(50)  # confident and wrong: far worse than a uniform guess
    with pytest.raises(UserError, match="worse than its start by over a nat"):
        health.check(2, {"loss": 1.0}, "kept")
    trained = HealthCheck((ids, labels), compute, model)
    trained.cut = UNIFORM_NLL  # as for a run that starts from a trained model
    with pytest.raises(UserError, match="worse than a uniform guess \\(10.8\\)"):
        trained.check(3, {"loss": 1.0}, "kept")


def test_a_training_loss_that_is_not_finite_stops_at_once():
    with pytest.raises(UserError, match="the training loss is nan at step 7.*lower --lr or --dtype bfloat16"):
        check_losses({"iter": 7, "loss": float("nan")}, "float16", "no checkpoint")
    with pytest.raises(UserError) as error:
        check_losses({"iter": 7, "loss": float("inf")}, "bfloat16", "no checkpoint")
    assert "bfloat16" not in str(error.value)
    with pytest.raises(UserError, match="the training value loss is nan at step 3.*lower --value_lr"):
        check_losses({"iter": 3, "loss": 0.5, "value_loss": float("nan")}, "float32", "no checkpoint")


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
    real = StopSignals.requested
    monkeypatch.setattr(StopSignals, "requested",
                        lambda self, compute=None: len(read_log(tmp_path, "train")) == 2 or real(self, compute))
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
