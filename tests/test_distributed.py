"""torchrun (DDP) on CPU with gloo: two processes take exactly the optimizer steps one process takes with
the same flags (each does half of the step's micro-batches), resume exactly, and stop together.

Each torchrun launch starts two Python processes that import torch (several seconds on 2 cores), so the
runs are tiny and shared: one single-process baseline, then each launch is compared with it.
"""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

import dpo
import sft
from conftest import ROOT, read_log
from data import toy_pairs
from machinery import UserError
from machinery.models import load_checkpoint
from machinery.compute import Compute, init_compute

MODEL = ["--init", "scratch", "--device", "cpu", "--n_layer", "1", "--n_head", "2", "--n_embd", "32",
         "--max_len", "64", "--batch_size", "2", "--grad_accum", "4", "--eval_batches", "3", "--eval_interval", "2",
         "--lr", "1e-3", "--warmup", "1"]


def torchrun(script, *args, env=None):
    """`torchrun --standalone --nproc_per_node 2 script args` (script in the project root, or a path)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(ROOT, str(script)), *map(str, args)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    """60 toy pairs, and the single-process SFT and DPO runs every torchrun run is compared with."""
    root = tmp_path_factory.mktemp("ddp")
    (root / "pairs.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in toy_pairs("train")[:60]))
    sft.main(MODEL + ["--data", str(root / "pairs.jsonl"), "--out_dir", str(root / "sft"), "--max_iters", "4",
                      "--lr_decay_iters", "4"])
    dpo.main(dpo_flags(root) + ["--out_dir", str(root / "dpo")])
    return root


def dpo_flags(root):
    # lr 1e-4: Adam turns float32 rounding in the summation order into update noise proportional to lr
    return [str(flag) for flag in MODEL[2:]] + ["--init", str(root / "sft"), "--data", str(root / "pairs.jsonl"),
                                                "--max_iters", "3", "--optimizer", "adamw", "--precompute_ref",
                                                "--lr", "1e-4"]


def assert_same_run(one, two):
    """Same losses at every step and eval, same final weights: up to float32 summation order."""
    for split in ("train", "test"):
        a, b = read_log(one, split), read_log(two, split)
        assert [r["iter"] for r in a] == [r["iter"] for r in b]
        for x, y in zip(a, b):
            for key in x:
                if key not in ("dt_ms", "tokens_per_s", "lr", "iter", "split"):
                    assert y[key] == pytest.approx(x[key], rel=1e-6, abs=1e-5), (split, x["iter"], key)
    weights_one, weights_two = load_checkpoint(one / "ckpt.pt")["model"], load_checkpoint(two / "ckpt.pt")["model"]
    for name, tensor in weights_one.items():
        # 1e-5, 1% of one step at lr 1e-3: the keys' bias of c_attn has no true gradient (a constant added to every
        # key cancels in the softmax), only rounding, which Adam's normalized steps carry into the weight
        torch.testing.assert_close(weights_two[name], tensor, atol=1e-5, rtol=0, msg=name)


def test_two_processes_take_the_sft_steps_of_one_and_resume_exactly(runs_dir):
    flags = MODEL + ["--data", runs_dir / "pairs.jsonl", "--out_dir", runs_dir / "sft-2", "--lr_decay_iters", "4"]
    first = torchrun("sft.py", *flags, "--max_iters", "2")
    assert first.returncode == 0, first.stderr
    assert "torchrun: 2 processes, 2 micro-batches each per step" in first.stdout
    assert first.stdout.count("saved ") == 1  # process 0 speaks for both
    second = torchrun("sft.py", *flags, "--max_iters", "4", "--resume")
    assert second.returncode == 0, second.stderr
    assert_same_run(runs_dir / "sft", runs_dir / "sft-2")


def test_two_processes_take_the_dpo_steps_of_one(runs_dir):
    # --precompute_ref: the reference's table is filled by both processes, then added up
    result = torchrun("dpo.py", *dpo_flags(runs_dir), "--out_dir", runs_dir / "dpo-2")
    assert result.returncode == 0, result.stderr
    assert_same_run(runs_dir / "dpo", runs_dir / "dpo-2")
    assert read_log(runs_dir / "dpo-2", "test")[0]["loss"] == pytest.approx(0.693147, abs=1e-6)  # ln 2 at step 0


def test_a_nan_on_one_process_stops_both_with_one_message(runs_dir, tmp_path):
    wrapper = tmp_path / "nan_on_process_1.py"
    wrapper.write_text(
        "import os\n"
        "import model, sft\n"
        "real, calls = model.GPT.forward, [0]\n"
        "def forward(self, idx, labels=None, **kwargs):\n"
        "    out = real(self, idx, labels, **kwargs)\n"
        "    if self.training and os.environ['RANK'] == '1':\n"
        "        calls[0] += 1\n"
        "        return out * float('nan') if calls[0] >= 3 else out  # step 2: 2 micro-batches a step each\n"
        "    return out\n"
        "model.GPT.forward = forward\n"
        "sft.main()\n")
    result = torchrun(wrapper, *MODEL, "--data", runs_dir / "pairs.jsonl", "--out_dir", tmp_path / "out",
                      "--max_iters", "4")
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert ours == [f"error: the training loss is nan at step 2: stopped; no checkpoint was saved in "
                    f"{tmp_path / 'out'} by this run. Try a lower --lr"]
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_grad_accum_must_divide_among_the_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    args = argparse.Namespace(device="cpu", dtype="auto", grad_accum=3)
    with pytest.raises(UserError, match="--grad_accum 3 is the step's micro-batches in all, so it must be "
                                        "a multiple of the 2 processes"):
        init_compute(args)


def test_a_collective_that_fails_names_the_process_and_what_it_waited_for():
    compute = Compute("cpu", "float32", None, None, rank=1, world_size=2, timeout=5)

    def timed_out(tensor, **kwargs):  # what gloo raises when the other process stopped answering
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting "
                           "5000ms for recv operation to complete\nmore lines")

    with pytest.raises(UserError) as error:
        compute._collective(timed_out, torch.zeros(1), what="the sum of a metric")
    message = str(error.value)
    assert "\n" not in message and message.startswith("process 1 of 2 waited for the sum of a metric")
    assert "--dist_timeout 5 s" in message and "Timed out waiting 5000ms" in message


def test_a_process_that_dies_mid_run_is_one_line_from_the_others(runs_dir, tmp_path):
    wrapper = tmp_path / "die_on_process_1.py"
    wrapper.write_text(
        "import os\n"
        "import model, sft\n"
        "real, calls = model.GPT.forward, [0]\n"
        "def forward(self, idx, labels=None, **kwargs):\n"
        "    if self.training and os.environ['RANK'] == '1':\n"
        "        calls[0] += 1\n"
        "        if calls[0] == 5:  # step 3: process 1 dies, as a killed or crashed worker would\n"
        "            os._exit(3)\n"
        "    return real(self, idx, labels, **kwargs)\n"
        "model.GPT.forward = forward\n"
        "sft.main()\n")
    result = torchrun(wrapper, *MODEL, "--data", runs_dir / "pairs.jsonl", "--out_dir", tmp_path / "out",
                      "--max_iters", "6", "--dist_timeout", "30")
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and ours[0].startswith("error: process 0 of 2: a collective with the other processes failed")
    assert "one of them stopped or froze" in ours[0] and "the last checkpoint, step 2" in ours[0]
    assert "local_rank: 1" in result.stderr  # the launcher names the process that died
