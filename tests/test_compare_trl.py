"""benchmarks/compare_trl.py without trl: the workload it builds from the shipped excerpt, the commands
it runs (checked by the scripts' own parsers), and one clear line when trl is missing."""
import os
import sys

import pytest

import dpo
from benchmarks import compare_trl, trl_dpo, workload
from data import get_tokenizer


def test_workload_is_the_first_400_excerpt_pairs_that_fit_in_256_tokens():
    pairs = workload.hh_pairs()
    assert len(pairs) == 400
    encode = get_tokenizer().encode_ordinary
    assert all(len(encode(p["prompt"])) + max(len(encode(p["chosen"])), len(encode(p["rejected"]))) + 1 <= 256
               for p in pairs)
    first = pairs[0]  # line 1 of the excerpt, a three-turn dialogue, read by hand
    assert first["prompt"].startswith("\n\nHuman: How much alcohol can I drink per day?\n\nAssistant: Alcohol is a")
    assert first["prompt"].endswith("\n\nHuman: I feel much better when I get drunk and consume a lot of alcohol."
                                    "\n\nAssistant:")
    assert first["prompt"].count("\n\nHuman:") == 3
    assert first["chosen"] == (" Sounds like alcohol is something you use to calm down when you feel stressed.   It "
                               "may be helpful to try getting in touch with your emotions.  When you feel stressed, "
                               "instead of turning to alcohol, try taking a few deep breaths or using mindfulness, "
                               "in the moment, to calm down.")
    assert first["rejected"] == (" I’m glad that you’re enjoying your alcohol intake. Can I ask about how you feel "
                                 "when you don’t drink alcohol?")
    assert pairs[-1]["prompt"].endswith("\n\nHuman: How can I get Netflix free after 24 hours?\n\nAssistant:")


def test_our_command_is_what_dpo_py_accepts(tmp_path):
    model_dir = str(tmp_path)  # dpo.py checks that its --init exists
    command = compare_trl.ours_command(model_dir, "pairs.jsonl", 10, "out-dir", ["--share_prompt", "--chunked_head"])
    assert command[:2] == [sys.executable, os.path.join(compare_trl.ROOT, "dpo.py")]
    args = dpo.parse_args(command[2:])
    assert (args.init, args.data, args.out_dir) == (model_dir, "pairs.jsonl", "out-dir")
    assert (args.batch_size, args.grad_accum, args.max_len, args.max_iters) == (4, 1, 256, 10)
    assert (args.device, args.dtype, args.beta, args.lr, args.eval_interval) == ("cpu", "float32", 0.1, 1e-6, 0)
    assert args.share_prompt and args.chunked_head and args.optimizer == "adamw"  # TRL's default optimizer
    plain = dpo.parse_args(compare_trl.ours_command(model_dir, "p", 2, "o")[2:])
    assert not plain.share_prompt and not plain.chunked_head


def test_trl_command_is_what_trl_dpo_py_accepts():
    command = compare_trl.trl_command("work", 2)
    assert command[1:3] == ["-m", "benchmarks.trl_dpo"]
    args = trl_dpo.parse_args(command[3:])
    assert (args.workload, args.steps, args.batch_size) == ("work", 2, compare_trl.BATCH_PAIRS)


def test_without_trl_each_script_says_so_in_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "trl", None)  # as if trl were not installed
    with pytest.raises(SystemExit) as exit_info:
        trl_dpo.main(["--workload", str(tmp_path), "--steps", "2"])
    assert exit_info.value.code == "error: the TRL side of the comparison needs trl: pip install trl"
    with pytest.raises(SystemExit) as exit_info:
        compare_trl.main(["--workload", str(tmp_path)])
    assert exit_info.value.code == "error: the TRL side needs trl: pip install trl (or pass --ours_only)"
    assert os.listdir(tmp_path) == []  # refused before building anything


def test_short_must_be_below_long(capsys):
    with pytest.raises(SystemExit):
        compare_trl.main(["--short", "5", "--long", "3"])
    assert "need 1 <= short < long" in capsys.readouterr().err.strip().splitlines()[-1]
