"""A user's saved runs are never lost by an ordinary mistake, a broken model is never saved over a good
one, --resume continues the same experiment or says why not, and every mistake is one line.

The runs here are tiny (a 1-layer model, a 60-pair file of toy pairs, a few steps), so each case costs
about a second; what they check is what happens to OUT_DIR, not what the model learns.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import dpo
import runs
import sample
import sft
from conftest import ROOT, make_hf_gpt2, read_log
from data import toy_pairs
from model import GPT
from runs import OutDir, UserError, load_checkpoint

SMALL = ["--device", "cpu", "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--batch_size", "4",
         "--eval_batches", "1", "--max_len", "64"]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """60 toy pairs in one .jsonl: 57 train, 3 test (every 20th held out). Loads in a blink."""
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(pair) + "\n" for pair in toy_pairs("train")[:60]))
    return str(path)


def sft_run(out_dir, pairs_file, *extra):
    sft.main(["--init", "scratch", "--data", pairs_file, "--out_dir", str(out_dir), "--max_iters", "4",
              "--eval_interval", "2", "--lr", "1e-3", "--warmup", "1"] + SMALL + list(extra))


def refused(call, capsys):
    """The one line a refused command prints, and that it exited non-zero."""
    with pytest.raises(SystemExit) as exit_info:
        call()
    code = exit_info.value.code
    shown = (code if isinstance(code, str) else "") + capsys.readouterr().err
    assert code not in (0, None), shown
    lines = [line for line in shown.strip().splitlines() if line]
    assert len(lines) == 1 and "Traceback" not in shown, shown
    return lines[0]


def snapshot(out_dir):
    return {name: (out_dir / name).read_bytes() for name in ("ckpt.pt", "log.jsonl")}


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory, pairs_file):
    """A finished 4-step SFT run; tests copy it or only read it."""
    out_dir = tmp_path_factory.mktemp("runs") / "sft"
    sft_run(out_dir, pairs_file)
    return out_dir


def copy_of(run_dir, tmp_path):
    import shutil
    target = tmp_path / run_dir.name
    shutil.copytree(run_dir, target)
    return target


# ----------------------------------------------------------------------------------------------------
# Saved work is never destroyed by accident

def test_a_new_run_into_a_saved_one_refuses_and_touches_nothing(sft_dir, pairs_file, tmp_path, capsys):
    out_dir = copy_of(sft_dir, tmp_path)
    before = snapshot(out_dir)
    line = refused(lambda: sft_run(out_dir, pairs_file, "--max_iters", "2"), capsys)
    assert f"{out_dir} holds a run at step 4: pass --resume to continue it" in line
    assert snapshot(out_dir) == before
    assert not (out_dir / "run.lock").exists()


def test_overwrite_replaces_the_run(sft_dir, pairs_file, tmp_path):
    out_dir = copy_of(sft_dir, tmp_path)
    sft_run(out_dir, pairs_file, "--max_iters", "2", "--overwrite")
    assert load_checkpoint(out_dir / "ckpt.pt")["iter"] == 2
    assert [r["iter"] for r in read_log(out_dir, "train")] == [1, 2]


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
    assert "is a DPO run" in line and "pass --ref explicitly" in line
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


# ----------------------------------------------------------------------------------------------------
# A broken model is never saved over a good one

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
                                            (-1000.0, "at step 4 the model gives the held-out text 1000")])
def test_a_broken_eval_stops_the_run_and_keeps_the_last_good_checkpoint(pairs_file, tmp_path, capsys,
                                                                        monkeypatch, value, message):
    poison_eval(monkeypatch, after_evals=2, value=value)  # evals at steps 0 and 2 are fine, 4 is not
    line = refused(lambda: sft_run(tmp_path, pairs_file, "--max_iters", "6"), capsys)
    assert message in line
    assert f"the last good checkpoint, step 2, is kept in {tmp_path / 'ckpt.pt'}" in line
    assert load_checkpoint(tmp_path / "ckpt.pt")["iter"] == 2
    last = read_log(tmp_path, "test")[-1]
    assert last["iter"] == 4 and (math.isnan(last["ppl"]) or last["ppl"] == float("inf"))  # exp(1000): no crash


def test_a_broken_first_eval_says_no_checkpoint_exists(pairs_file, tmp_path, capsys, monkeypatch):
    poison_eval(monkeypatch, after_evals=0, value=float("nan"))
    line = refused(lambda: sft_run(tmp_path, pairs_file), capsys)
    assert "the held-out loss is nan at step 0" in line and "no checkpoint was saved" in line
    assert not (tmp_path / "ckpt.pt").exists()


def test_the_final_checkpoint_is_written_before_the_final_eval(pairs_file, tmp_path, monkeypatch):
    real = sft.evaluate

    def crash_at_the_end(model, examples, args, ctx):
        if os.path.exists(tmp_path / "ckpt.pt") and load_checkpoint(tmp_path / "ckpt.pt")["iter"] == 3:
            raise RuntimeError("the machine went down during the final eval")
        return real(model, examples, args, ctx)

    monkeypatch.setattr(sft, "evaluate", crash_at_the_end)
    with pytest.raises(RuntimeError):
        sft_run(tmp_path, pairs_file, "--max_iters", "3", "--eval_interval", "0")
    assert load_checkpoint(tmp_path / "ckpt.pt")["iter"] == 3


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


def test_the_nan_message_suggests_bfloat16_only_for_float16(tmp_path):
    import argparse
    for dtype, tip in (("float32", False), ("bfloat16", False), ("float16", True)):
        out = OutDir(argparse.Namespace(out_dir=str(tmp_path), dtype=dtype), "sft", runs.Compute("cpu", dtype, None, None))
        with pytest.raises(UserError) as error:
            out.check(7, float("nan"), float("nan"), "training")
        assert "at step 7" in str(error.value) and ("bfloat16" in str(error.value)) == tip


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
    assert f"{signals[0]}: finishing this step, saving a checkpoint" in stdout
    assert "stopping early: this step is saved; continue with --resume" in stdout
    assert load_checkpoint(tmp_path / "ckpt.pt")["iter"] == len(read_log(tmp_path, "train"))
    assert not (tmp_path / "run.lock").exists()


def test_a_full_disk_while_saving_keeps_the_old_checkpoint(sft_dir, pairs_file, tmp_path, capsys, monkeypatch):
    out_dir = copy_of(sft_dir, tmp_path)
    before = (out_dir / "ckpt.pt").read_bytes()

    def full_disk(obj, path, *rest, **kwargs):
        with open(path, "wb") as f:
            f.write(b"PK half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runs.torch, "save", full_disk)
    line = refused(lambda: sft_run(out_dir, pairs_file, "--resume", "--max_iters", "6", "--lr_decay_iters", "4"),
                   capsys)
    assert "could not write the step-6 checkpoint" in line and "No space left on device" in line
    assert "the last good checkpoint, step 4, is kept" in line
    assert (out_dir / "ckpt.pt").read_bytes() == before


# ----------------------------------------------------------------------------------------------------
# --resume continues the same experiment, or says why not

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


def test_a_torn_last_log_line_is_dropped_with_a_notice(sft_dir, pairs_file, tmp_path, capsys):
    out_dir = copy_of(sft_dir, tmp_path)
    with open(out_dir / "log.jsonl", "a") as f:
        f.write('{"iter": 5, "split": "tra')  # a crash in the middle of a write
    sft_run(out_dir, pairs_file, "--resume", "--max_iters", "6", "--lr_decay_iters", "4")
    assert "is not a whole record (cut off by a crash?); dropped" in capsys.readouterr().out
    assert [r["iter"] for r in read_log(out_dir, "train")] == [1, 2, 3, 4, 5, 6]


# ----------------------------------------------------------------------------------------------------
# Every user mistake is one line, checked before work starts

@pytest.mark.parametrize("flags, message", [
    (["--grad_clip", "-1"], "--grad_clip must not be negative"),
    (["--weight_decay", "-0.1"], "--weight_decay must not be negative"),
    (["--lr_decay_iters", "-5"], "--lr_decay_iters must not be negative"),
    (["--n_head", "0"], "--n_head must be at least 1"),
    (["--n_embd", "0"], "--n_embd must be at least 1"),
    (["--dropout", "1"], "--dropout is a probability in [0, 1)"),
    (["--dropout", "-0.1"], "--dropout is a probability in [0, 1)"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--device", "gpu"], "--device gpu is not a device"),
    (["--resume", "--overwrite"], "pass one"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "this machine has no CUDA GPU")])
  + ([] if torch.backends.mps.is_available() else [(["--device", "mps"], "this machine has no Apple GPU")]))
def test_bad_flags_are_one_line(flags, message, tmp_path, capsys):
    line = refused(lambda: sft.main(["--demo", "--out_dir", str(tmp_path / "x")] + flags), capsys)
    assert message in line
    assert not (tmp_path / "x").exists()


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


def test_corrupt_model_files_are_one_line(tmp_path):
    make_hf_gpt2(tmp_path, n_positions=64, n_layer=1, n_head=2, n_embd=32)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_layer": "1"}))
    with pytest.raises(UserError, match="n_layer is '1', expected a positive whole number"):
        GPT.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(config))
    weights = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(weights[:len(weights) // 2])  # a torn download
    with pytest.raises(UserError, match="is not a readable safetensors file"):
        GPT.from_pretrained(str(tmp_path))


def test_help_shows_every_default_once(capsys, monkeypatch):
    import re

    import bench
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps help to the terminal's width
    for script, parse_args in (("sft.py", sft.parse_args), ("dpo.py", dpo.parse_args),
                               ("sample.py", sample.parse_args), ("bench.py", bench.parse_args)):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(["--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        options = re.split(r"\n  (?=-)", text.split("\noptions:\n")[1])[1:]  # all but -h
        assert len(options) > 5, script
        for option in options:
            assert " ".join(option.split()).count("(default") == 1, (script, option)
        if script == "sft.py":
            demo_help = " ".join(text.split())
            assert "--demo the offline toy task on a tiny model, sized for a CPU: sets --init scratch" in demo_help


# ----------------------------------------------------------------------------------------------------
# sample.py: checked before it samples

@pytest.mark.parametrize("flags, message", [
    (["--max_new_tokens", "0"], "--max_new_tokens must be at least 1, got 0"),
    (["--num_prompts", "0"], "--num_prompts must be at least 1, got 0"),
    (["--device", "gpu"], "is not a device"),
])
def test_sample_flags_that_used_to_be_replaced_silently(flags, message, capsys):
    assert message in refused(lambda: sample.main(["--model", "x", "--prompt", "hi"] + flags), capsys)


def test_sample_checks_its_output_and_inputs_before_sampling(sft_dir, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    line = refused(lambda: sample.main(["--model", str(sft_dir), "--prompt", "hi", "--results_dir", str(a_file),
                                        "--device", "cpu"]), capsys)
    assert "cannot write" in line
    latin = tmp_path / "prompts.txt"
    latin.write_bytes("caf\xe9 ol\xe9".encode("latin-1"))
    line = refused(lambda: sample.main(["--model", str(sft_dir), "--prompts_file", str(latin), "--results_dir",
                                        str(tmp_path), "--device", "cpu"]), capsys)
    assert "is not UTF-8 text" in line
    line = refused(lambda: sample.main(["--model", str(sft_dir), "--prompt", "hi", "--max_new_tokens", "64",
                                        "--results_dir", str(tmp_path), "--device", "cpu"]), capsys)
    assert "--max_new_tokens 64 leaves no room for a prompt in a context of 64 tokens" in line
    assert sorted(os.listdir(tmp_path)) == ["a_file", "prompts.txt"]  # nothing half-written


def test_sample_crops_a_long_prompt_with_a_notice(sft_dir, tmp_path, capsys):
    sample.main(["--model", str(sft_dir), "--prompt", "word " * 100, "--max_new_tokens", "8", "--device", "cpu",
                 "--results_dir", str(tmp_path), "--name", "long"])
    assert "1 of 1 prompts are longer than the 56 tokens" in capsys.readouterr().out
    record = json.loads((tmp_path / "long.json").read_text())
    assert record["samples"]["sft"][0]["tokens"] >= 1


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
