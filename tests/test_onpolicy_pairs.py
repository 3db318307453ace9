"""experiments/onpolicy_pairs.py: two samples of a model per toy prompt, the oracle's choice as chosen, written as
a pairs file dpo.py reads; it never writes over a file unless told, and every mistake is one line."""
import json
import os

import pytest

from conftest import refused
from data import toy_reward
from experiments import onpolicy_pairs


def make(toy_models, out, *extra):
    onpolicy_pairs.main(["--init", toy_models["sft"], "--num_prompts", "40", "--max_new_tokens", "24", "--out",
                         str(out), *extra])


def test_pairs_are_the_oracles_choice_and_an_existing_file_is_refused(toy_models, tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    make(toy_models, out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(toy_reward(r["prompt"], r["chosen"]) > toy_reward(r["prompt"], r["rejected"]) for r in rows)
    before = out.read_bytes()
    line = refused(lambda: make(toy_models, out), capsys)
    assert "exists; pass --overwrite to replace it" in line and out.read_bytes() == before
    make(toy_models, out, "--overwrite", "--seed", "7")  # told: replaced, whole
    assert out.read_bytes() != before


def test_a_directory_or_an_unwritable_folder_is_one_line(toy_models, tmp_path, capsys):
    assert "is a directory; give a file name" in refused(lambda: make(toy_models, tmp_path), capsys)
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o555)
    target = read_only if not os.access(read_only, os.W_OK) else "/proc/nanodpo-test"  # root: a read-only fs
    assert "cannot write --out" in refused(lambda: make(toy_models, f"{target}/pairs.jsonl"), capsys)


def test_no_pairs_is_an_error_and_writes_nothing(toy_models, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(onpolicy_pairs, "toy_reward", lambda prompt, reply: 0.0)  # an oracle that ties everything
    line = refused(lambda: make(toy_models, tmp_path / "pairs.jsonl"), capsys)
    assert "no pairs, nothing written" in line and not (tmp_path / "pairs.jsonl").exists()


def test_a_full_disk_while_writing_keeps_the_old_file(toy_models, tmp_path, capsys, monkeypatch):
    out = tmp_path / "pairs.jsonl"
    out.write_text("the old pairs\n")

    def full_disk(path, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onpolicy_pairs, "write_text", full_disk)
    line = refused(lambda: make(toy_models, out, "--overwrite"), capsys)
    assert "No space left on device" in line and out.read_text() == "the old pairs\n"
