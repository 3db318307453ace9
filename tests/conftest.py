"""Shared test setup: no network waits, the HH excerpt, tiny GPT-2 checkpoints, the toy pipeline, and a
guard that the suite never touches the repository's out/ or results/.

The whole suite runs in a scratch working directory where the demo has already been run (its out/demo
holds saved runs), as a user's clone would after the README's first command: a test that ran a script
without its own --out_dir would hit those runs and fail. tiktoken needs GPT-2's vocabulary: from the
network on first use, or offline from TIKTOKEN_CACHE_DIR."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the first 512 records of HH-RLHF harmless-base test, shipped in the repository (see its README)
HH_TEST = os.path.join(ROOT, "examples", "hh-rlhf-harmless-base", "test.jsonl.gz")
# no test may wait on the network: hub calls fail at once instead of retrying for ~20 s
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
torch.set_num_threads(min(2, torch.get_num_threads()))
TINY = ["--device", "cpu", "--n_layer", "2", "--n_head", "4", "--n_embd", "64"]
GUARDED = ("out", "results")  # the repository's folders no test may write to


def _tree(top):
    """{relative path: (size, modification time in ns)} of every file under ROOT/top (nothing if it does not
    exist): any write changes one or both, and reading a user's gigabytes of out/ to hash them would not."""
    found = {}
    for directory, _, files in os.walk(os.path.join(ROOT, top)):
        for name in files:
            path = os.path.join(directory, name)
            stat = os.stat(path)
            found[os.path.relpath(path, ROOT)] = (stat.st_size, stat.st_mtime_ns)
    return found


def pytest_sessionstart(session):
    session.config.guarded = {top: _tree(top) for top in GUARDED}


def pytest_sessionfinish(session, exitstatus):
    changed = [top for top in GUARDED if _tree(top) != session.config.guarded[top]]
    if changed:
        print(f"\nerror: the test suite changed the repository's {' and '.join(changed)}/: every test must write "
              "under its tmp_path", file=sys.stderr)
        session.exitstatus = 1


@pytest.fixture(scope="session", autouse=True)
def a_clone_after_the_demo(tmp_path_factory):
    """The suite's working directory: a scratch folder whose out/demo/{sft,dpo,dpo-bad} hold saved runs,
    as the demo leaves them, so that a script run with its default --out_dir refuses instead of writing."""
    from machinery.run import save_checkpoint
    from model import GPT, GPTConfig
    import argparse
    workdir = tmp_path_factory.mktemp("clone")
    model = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=2, n_embd=16))
    optimizer = torch.optim.AdamW(model.parameters())
    for name in ("sft", "dpo", "dpo-bad"):
        save_checkpoint(str(workdir / "out" / "demo" / name), model, optimizer, None, 300,
                        argparse.Namespace(), stage="dpo" if name.startswith("dpo") else "sft")
    before = os.getcwd()
    os.chdir(workdir)
    yield workdir
    os.chdir(before)


def make_hf_gpt2(directory, vocab_size=50257, n_positions=128, n_layer=2, n_head=2, n_embd=32, seed=0):
    """A random GPT-2 written by transformers.save_pretrained (the Hugging Face layout)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_layer=n_layer,
                                       n_head=n_head, n_embd=n_embd, attn_implementation="eager"))
    model.save_pretrained(str(directory))
    return model.eval()


def run_script(script, *args, env=None, timeout=600, module=False):
    """Run one of the project's scripts as a user would (`python sft.py ...`, or `python -m NAME ...` with
    module) from the suite's working directory; returns the CompletedProcess."""
    command = [sys.executable, "-m", script] if module else [sys.executable, os.path.join(ROOT, script)]
    environment = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
    return subprocess.run(command + list(map(str, args)), capture_output=True, text=True, timeout=timeout,
                          env=environment)


@pytest.fixture(scope="session")
def toy_models(tmp_path_factory):
    """The demo pipeline at a smaller scale: SFT from scratch on both toy tones (polite and rude), then DPO and the
    swapped ("bad") DPO from it. The suite's largest cost; shared by the SFT, DPO and sample tests."""
    import dpo
    import sft
    root = tmp_path_factory.mktemp("toy")
    dirs = {name: str(root / name) for name in ("sft", "dpo", "dpo-bad")}
    # the demo's shape at 4/5 of its SFT steps and 2/3 of its batch: the suite's time budget, yet long enough for
    # the model to answer most requests (the oracle pays only answers; each test's margin is in the test)
    sft.main(["--demo", "--max_iters", "400", "--eval_interval", "400", "--eval_batches", "2",  # evals at 0, 400
              "--batch_size", "16", "--out_dir", dirs["sft"]] + TINY)
    common = ["--demo", "--init", dirs["sft"], "--beta", "0.1", "--lr", "1e-4", "--max_iters", "20",
              "--eval_interval", "20", "--eval_batches", "4", "--batch_size", "8"]  # evals at step 0 and at the end
    dpo.main(common + ["--out_dir", dirs["dpo"]])
    dpo.main(common + ["--swap", "--out_dir", dirs["dpo-bad"]])
    return dirs


def read_log(out_dir, split):
    import json
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


# ----------------------------------------------------------------------------------------------------
# Tiny runs for the machinery's tests: a 1-layer model, 60 toy pairs, a few steps; about a second each

SMALL = ["--device", "cpu", "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--batch_size", "4",
         "--eval_batches", "1", "--max_len", "64"]


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory):
    """60 toy pairs in one .jsonl: 57 train, 3 test (every 20th held out). Loads in a blink."""
    import json
    from data import toy_pairs
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(pair) + "\n" for pair in toy_pairs("train")[:60]))
    return str(path)


def sft_run(out_dir, pairs_file, *extra):
    import sft
    sft.main(["--init", "scratch", "--data", pairs_file, "--out_dir", str(out_dir), "--max_iters", "4",
              "--eval_interval", "2", "--lr", "1e-3", "--warmup", "1"] + SMALL + list(extra))


@pytest.fixture(scope="session")
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


def refused(call, capsys, code=None):
    """The one line a refused command prints; it exited non-zero (with `code`, if given)."""
    with pytest.raises(SystemExit) as exit_info:
        call()
    status = exit_info.value.code
    shown = (status if isinstance(status, str) else "") + capsys.readouterr().err
    assert status not in (0, None), shown
    if code is not None:
        assert (1 if isinstance(status, str) else status) == code, shown
    lines = [line for line in shown.strip().splitlines() if line]
    assert len(lines) == 1 and "Traceback" not in shown, shown
    return lines[0]


def snapshot(out_dir):
    return {name: (out_dir / name).read_bytes() for name in ("ckpt.pt", "log.jsonl")}


def one_line_user_error(call):
    """The message of the UserError call() raises: one line, not empty."""
    from machinery import UserError
    with pytest.raises(UserError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message and message
    return message
