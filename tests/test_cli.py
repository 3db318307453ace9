"""machinery/cli.py: every flag mistake is one line and exit status 2, checked before anything is loaded
or written; --help shows each default once; a demo run is named by the flags it changes; the "next"
command repeats the run's own flags."""
import os
import re
import shlex

import pytest
import torch

import data
import dpo
import plot
import sample
import sft
from benchmarks import bench, memory
from conftest import one_line_user_error, refused
from machinery import cli


@pytest.mark.parametrize("flags, message", [
    (["--grad_clip", "-1"], "argument --grad_clip: must not be negative, got -1"),
    (["--weight_decay", "-0.1"], "argument --weight_decay: must not be negative"),
    (["--lr_decay_iters", "-5"], "argument --lr_decay_iters: must be at least 0, got -5"),
    (["--n_head", "0"], "argument --n_head: must be at least 1, got 0"),
    (["--n_embd", "0"], "argument --n_embd: must be at least 1"),
    (["--dropout", "1"], "argument --dropout: must be in [0, 1), got 1"),
    (["--dropout", "-0.1"], "argument --dropout: must be in [0, 1)"),
    (["--lr", "nan"], "argument --lr: must be a finite number, got nan"),
    (["--lr", "0"], "argument --lr: must be a positive number, got 0"),
    (["--max_len", "1"], "argument --max_len: must be at least 2, got 1"),  # names the flag given, not another
    (["--max_len", "64", "--max_prompt_len", "64"], "--max_prompt_len 64 must be below --max_len 64"),
    (["--batch_size", "two"], "argument --batch_size: expected a whole number, got 'two'"),
    (["--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    (["--device", "gpu"], "--device gpu is not a device"),
    (["--resume", "--overwrite"], "pass one"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "this machine has no CUDA GPU")])
  + ([] if torch.backends.mps.is_available() else [(["--device", "mps"], "this machine has no Apple GPU")]))
def test_bad_flags_are_one_line_and_exit_2(flags, message, tmp_path, capsys):
    line = refused(lambda: sft.main(["--demo", "--out_dir", str(tmp_path / "x")] + flags), capsys, code=2)
    assert message in line
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("flags, message", [
    (["--beta", "inf"], "argument --beta: must be a finite number, got inf"),
    (["--beta", "0"], "argument --beta: must be a positive number"),
    (["--beta", "1e-30", "--loss_type", "ipo"], "--loss_type ipo: --beta 1e-30 asks a margin of 1/(2 beta) = 5e+29 nats"),
    (["--label_smoothing", "0.5"], "argument --label_smoothing: must be in [0, 0.5)"),
    (["--loss_type", "ipo", "--label_smoothing", "0.1"], "applies to the sigmoid loss only"),
])
def test_bad_dpo_flags_are_one_line_and_exit_2(flags, message, tmp_path, capsys):
    line = refused(lambda: dpo.main(["--demo", "--out_dir", str(tmp_path / "x")] + flags), capsys, code=2)
    assert message in line


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "inf"], "argument --temperature: must be a finite number"),
    (["--max_new_tokens", "0"], "argument --max_new_tokens: must be at least 1, got 0"),
    (["--num_prompts", "0"], "argument --num_prompts: must be at least 1, got 0"),
    (["--top_p", "0"], "argument --top_p: must be in (0, 1]"),
    (["--device", "gpu"], "is not a device"),
])
def test_bad_sample_flags_are_one_line_and_exit_2(flags, message, capsys):
    line = refused(lambda: sample.main(["--model", "x", "--prompt", "hi"] + flags), capsys, code=2)
    assert message in line


def test_under_torchrun_only_process_0_prints_a_flag_error(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as exit_info:
        sft.parse_args(["--demo", "--lr", "-1"])
    assert exit_info.value.code == 2 and capsys.readouterr().err == ""


def test_help_shows_every_default_once_and_a_whole_description(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps help to the terminal's width
    for script, parse_args in (("sft.py", sft.parse_args), ("dpo.py", dpo.parse_args),
                               ("sample.py", sample.parse_args), ("bench", bench.parse_args)):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(["--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        usage_and_description = text.split("\noptions:\n")[0]
        description = " ".join(usage_and_description.split("\n\n", 1)[1].split())
        assert description.endswith((".", ":")), (script, description)  # a whole sentence, not cut mid-way
        options = re.split(r"\n  (?=-)", text.split("\noptions:\n")[1])[1:]  # all but -h
        assert len(options) > 5, script
        for option in options:
            flat = " ".join(option.split())
            assert flat.count("(default") == 1, (script, option)
            assert "(default: [])" not in flat and "(default: None)" not in flat, (script, option)
    with pytest.raises(SystemExit):
        plot.parse_args(["--help"])
    text = capsys.readouterr().out
    assert text.count("The figures a learner draws of their own runs") == 1  # the description, once


def test_a_demo_run_is_named_by_the_flags_that_differ_from_the_demos():
    assert sft.parse_args(["--demo"]).out_dir == "out/demo/sft"
    assert sft.parse_args(["--demo", "--max_iters", "600", "--eval_interval", "50"]).out_dir == "out/demo/sft-max_iters600"
    assert dpo.parse_args(["--demo", "--beta", "0.1"]).out_dir == "out/demo/dpo"  # the demo's own beta
    assert dpo.parse_args(["--demo", "--beta", "0.5"]).out_dir == "out/demo/dpo-beta0.5"
    assert dpo.parse_args(["--demo", "--swap", "--lr", "3e-4"]).out_dir == "out/demo/dpo-bad-lr0.0003"
    assert dpo.parse_args(["--demo", "--init", "out/demo/sft-max_iters600", "--share_prompt"]).out_dir == \
        "out/demo/dpo-from-sft-max_iters600-share_prompt"
    assert dpo.parse_args(["--init", "out/sft"]).out_dir == "out/dpo" and sft.parse_args([]).out_dir == "out/sft"


def test_the_next_command_repeats_the_runs_own_flags():
    args = sft.parse_args(["--init", "scratch", "--data", "pairs.jsonl", "--device", "cpu", "--batch_size", "4",
                           "--grad_accum", "1", "--max_iters", "20", "--eval_interval", "10", "--lr", "3e-3",
                           "--out_dir", "out/hh-sft"])
    assert args.next == ("python dpo.py --data pairs.jsonl --device cpu --batch_size 4 --grad_accum 1 --max_iters 20 "
                         "--eval_interval 10 --init out/hh-sft")  # not SFT's lr: DPO has its own
    assert sft.parse_args(["--demo", "--max_iters", "600"]).next == "python dpo.py --demo --init out/demo/sft-max_iters600"
    assert dpo.parse_args(["--demo", "--beta", "0.5"]).next == "python sample.py --demo"
    args = dpo.parse_args(["--init", "out/hh-sft", "--data", "pairs.jsonl", "--device", "cpu", "--out_dir", "out/hh-dpo"])
    assert args.next == "python sample.py --data pairs.jsonl --device cpu --model reference=out/hh-sft --model dpo=out/hh-dpo"


def test_every_next_command_runs():
    # a demo run kept elsewhere is not among out/demo's runs: sample it by name
    args = dpo.parse_args(["--demo", "--out_dir", "elsewhere/dpo"])
    assert args.next == "python sample.py --demo --model reference=out/demo/sft --model dpo=elsewhere/dpo"
    # a reference from scratch is not kept anywhere: only the policy can be named
    args = dpo.parse_args(["--init", "scratch", "--data", "toy", "--out_dir", "out/x"])
    assert args.next == "python sample.py --data toy --model dpo=out/x"
    # a path with a space stays one word in a shell
    args = sft.parse_args(["--demo", "--out_dir", "my runs/sft"])
    assert args.next == "python dpo.py --demo --init 'my runs/sft'"
    assert sample.parse_args(shlex.split(dpo.parse_args(["--demo", "--init", "my runs/sft", "--out_dir", "my runs/dpo"])
                                         .next)[2:]).model == ["reference=my runs/sft", "dpo=my runs/dpo"]


def test_the_gpu_recipe_on_a_laptop_says_what_to_run_instead(tmp_path, monkeypatch, capsys):
    # `python dpo.py --beta 0.1`, the card's command, where out/sft does not exist: the defaults are the GPU recipe
    monkeypatch.chdir(tmp_path)
    line = refused(lambda: dpo.main(["--beta", "0.1"]), capsys)
    assert "no model at --init out/sft" in line and "GPU recipe" in line and "--demo" in line
    assert "examples/hh-rlhf-harmless-base" in line
    # and without the network, the hub's HH-RLHF: one line naming the shipped excerpt and the demo
    message = one_line_user_error(lambda: data.load_preferences("Anthropic/hh-rlhf", "train"))
    assert "could not load Anthropic/hh-rlhf [train]" in message
    assert "examples/hh-rlhf-harmless-base" in message and "--demo" in message


def test_memory_table_flags_are_one_line(capsys):
    line = refused(lambda: memory.main(["--response_frac", "1.5"]), capsys, code=2)
    assert "argument --response_frac: must be in [0, 1)" in line
