"""Shared test setup: the project root on sys.path, no network waits, the HH excerpt, tiny GPT-2 checkpoints.

tiktoken needs GPT-2's vocabulary: from the network on first use, or offline from TIKTOKEN_CACHE_DIR."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the first 512 records of HH-RLHF harmless-base test, shipped in the repository (see its README)
HH_TEST = os.path.join(ROOT, "examples", "hh-rlhf-harmless-base", "test.jsonl.gz")
sys.path.insert(0, ROOT)
# no test may wait on the network: hub calls fail at once instead of retrying for ~20 s
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
torch.set_num_threads(min(2, torch.get_num_threads()))


def make_hf_gpt2(directory, vocab_size=50257, n_positions=128, n_layer=2, n_head=2, n_embd=32, seed=0):
    """A random GPT-2 written by transformers.save_pretrained (the Hugging Face layout)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_layer=n_layer,
                                       n_head=n_head, n_embd=n_embd, attn_implementation="eager"))
    model.save_pretrained(str(directory))
    return model.eval()


def run_script(script, *args, env=None, timeout=600):
    """Run one of the project's scripts as a user would; returns the CompletedProcess."""
    import subprocess
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


TINY = ["--device", "cpu", "--n_layer", "2", "--n_head", "4", "--n_embd", "64"]


@pytest.fixture(scope="session")
def toy_models(tmp_path_factory):
    """The demo pipeline at a smaller scale: SFT from scratch on both toy tones (polite and rude), then DPO and the
    swapped ("bad") DPO from it. The suite's largest cost; shared by the SFT, DPO and sample tests."""
    import dpo
    import sft
    root = tmp_path_factory.mktemp("toy")
    dirs = {name: str(root / name) for name in ("sft", "dpo", "dpo-bad")}
    sft.main(["--demo", "--max_iters", "150", "--eval_interval", "150", "--eval_batches", "2",  # evals at 0, 150
              "--out_dir", dirs["sft"]] + TINY)
    common = ["--demo", "--init", dirs["sft"], "--beta", "0.1", "--lr", "1e-4", "--max_iters", "20",
              "--eval_interval", "20", "--eval_batches", "4"]  # evals at step 0 and at the end
    dpo.main(common + ["--out_dir", dirs["dpo"]])
    dpo.main(common + ["--swap", "--out_dir", dirs["dpo-bad"]])
    return dirs


def read_log(out_dir, split):
    import json
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]
