"""sample.py and machinery/results.py: side-by-side generations and the numbers of the demo, on the toy
pipeline; what it checks before it samples; strict JSON."""
import json
import math
import os

import pytest

import sample
from conftest import refused
from data import toy_reward
from machinery.results import strict, table


def test_sample_ranks_dpo_over_sft_over_the_bad_model(toy_models, tmp_path):
    sample.main(["--demo", "--model", f"sft={toy_models['sft']}", "--model", f"dpo={toy_models['dpo']}",
                 "--model", f"dpo-bad={toy_models['dpo-bad']}", "--num_prompts", "24",
                 "--results_dir", str(tmp_path), "--name", "small-demo"])
    record = json.loads((tmp_path / "small-demo.json").read_text())
    summary = record["summary"]
    assert summary["sft"]["kl"] == 0.0  # the reference against itself
    assert summary["dpo"]["kl"] > 0 and summary["dpo-bad"]["kl"] > 0
    assert summary["dpo"]["oracle_reward"] > summary["sft"]["oracle_reward"] + 0.2
    assert summary["sft"]["oracle_reward"] > summary["dpo-bad"]["oracle_reward"] + 0.2
    assert summary["sft"]["accuracy"] == 0.5 and summary["dpo"]["accuracy"] > 0.9
    # every model answered the same 24 prompts; rewards in the file are the oracle's on the text
    for label in ("sft", "dpo", "dpo-bad"):
        rows = record["samples"][label]
        assert [r["prompt"] for r in rows] == [r["prompt"] for r in record["samples"]["sft"]]
        assert len(rows) == 24
        assert all(r["reward"] == toy_reward(r["prompt"], r["completion"]) for r in rows)
        assert all("\n\nHuman:" not in r["completion"] for r in rows)
    markdown = (tmp_path / "small-demo.md").read_text()
    assert "| dpo-bad |" in markdown and "## Prompt 24" in markdown
    assert len((tmp_path / "small-demo.jsonl").read_text().splitlines()) == 3 * 24


def test_same_seed_same_samples_and_greedy_is_deterministic(toy_models, tmp_path):
    for name in ("a", "b"):
        sample.main(["--model", toy_models["sft"], "--prompt", "\n\nHuman: Hi, I am Ana. How do I bake bread?"
                     "\n\nAssistant:", "--max_new_tokens", "20", "--device", "cpu", "--results_dir",
                     str(tmp_path), "--name", name])
    a = json.loads((tmp_path / "a.json").read_text())["samples"]
    b = json.loads((tmp_path / "b.json").read_text())["samples"]
    assert a == b and a["sft"][0]["completion"]


def test_no_prompts_is_one_clear_line(toy_models, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--model", toy_models["sft"], "--device", "cpu"])
    assert "no prompts" in str(exit_info.value.code)


@pytest.mark.parametrize("flags, message", [
    (["--model", "a/dpo", "--model", "b/dpo"], "share a label"),
    (["--model", "x", "--top_k", "0"], "argument --top_k: must be at least 1"),
    (["--model", "x", "--top_p", "0"], "argument --top_p: must be in (0, 1]"),
])
def test_bad_sampling_flags(flags, message, capsys):
    with pytest.raises(SystemExit):
        sample.main(flags + ["--prompt", "hi"])
    assert message in capsys.readouterr().err


def test_a_prompt_longer_than_the_context_keeps_its_end(toy_models, tmp_path):
    sample.main(["--model", toy_models["sft"], "--prompt", "word " * 500, "--prompt", "", "--max_new_tokens", "20",
                 "--device", "cpu", "--results_dir", str(tmp_path), "--name", "long"])
    rows = json.loads((tmp_path / "long.json").read_text())["samples"]["sft"]
    assert len(rows) == 2 and all(r["tokens"] >= 1 for r in rows)


def test_sample_checks_its_output_and_inputs_before_sampling(toy_models, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    line = refused(lambda: sample.main(["--model", toy_models['sft'], "--prompt", "hi", "--results_dir", str(a_file),
                                        "--device", "cpu"]), capsys)
    assert "cannot write" in line
    latin = tmp_path / "prompts.txt"
    latin.write_bytes("caf\xe9 ol\xe9".encode("latin-1"))
    line = refused(lambda: sample.main(["--model", toy_models['sft'], "--prompts_file", str(latin), "--results_dir",
                                        str(tmp_path), "--device", "cpu"]), capsys)
    assert "is not UTF-8 text" in line
    line = refused(lambda: sample.main(["--model", toy_models['sft'], "--prompt", "hi", "--max_new_tokens", "64",
                                        "--results_dir", str(tmp_path), "--device", "cpu"]), capsys)
    assert "--max_new_tokens 64 leaves no room for a prompt in a context of 64 tokens" in line
    assert sorted(os.listdir(tmp_path)) == ["a_file", "prompts.txt"]  # nothing half-written


def test_sample_crops_a_long_prompt_with_a_notice(toy_models, tmp_path, capsys):
    sample.main(["--model", toy_models['sft'], "--prompt", "word " * 100, "--max_new_tokens", "8", "--device", "cpu",
                 "--results_dir", str(tmp_path), "--name", "long"])
    assert "1 of 1 prompts are longer than the 56 tokens" in capsys.readouterr().out
    record = json.loads((tmp_path / "long.json").read_text())
    assert record["samples"]["sft"][0]["tokens"] >= 1


def test_results_are_strict_json(toy_models, tmp_path):
    # one prompt: the standard errors are nan (no estimate from one sample); the files must say null, not NaN
    sample.main(["--model", toy_models["sft"], "--prompt", "hi", "--max_new_tokens", "4", "--device", "cpu",
                 "--results_dir", str(tmp_path), "--name", "one"])
    text = (tmp_path / "one.json").read_text()
    record = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))
    assert record["summary"]["sft"]["kl_se"] is None
    for line in (tmp_path / "one.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in the JSONL"))
    assert strict({"a": [1.0, math.inf, {"b": math.nan}]}) == {"a": [1.0, None, {"b": None}]}
    assert table({"m": {"kl": 0.5, "kl_se": math.nan}}) == "| model | KL from the reference (nats) |\n|---|---:|\n| m | 0.50 |"


def test_the_table_has_the_readmes_layout():
    summary = {"sft": {"mean_length": 20.5, "kl": 0.0, "kl_se": 0.0, "oracle_reward": 0.094, "oracle_reward_se": 0.096,
                       "accuracy": 0.5}}
    assert table(summary).splitlines() == [
        "| model | oracle reward | KL from the reference (nats) | mean length (tokens) | held-out accuracy |",
        "|---|---:|---:|---:|---:|", "| sft | 0.094 ± 0.096 | 0.00 | 20.5 | 0.500 |"]


def test_a_full_disk_for_the_results_is_one_line_and_leaves_no_folder(toy_models, tmp_path, capsys, monkeypatch):
    real_open = open

    def full_disk(path, *args, **kwargs):
        if str(path).endswith(".probe"):
            raise OSError(28, "No space left on device")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_disk)
    line = refused(lambda: sample.main(["--model", toy_models["sft"], "--prompt", "hi", "--device", "cpu",
                                        "--results_dir", str(tmp_path / "new")]), capsys)
    assert "No space left on device" in line and not (tmp_path / "new").exists()
