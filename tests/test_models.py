"""machinery/models.py: Hugging Face weights in, each mistake one line before anything loads, and out:
what save_pretrained writes, transformers loads, to the same logits."""
import json
import logging
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_hf_gpt2, one_line_user_error, refused, run_script
from machinery import UserError, models
from machinery.models import open_model
from machinery.models import load_pretrained, save_pretrained
from test_model import SMALL, random_tokens, tiny_gpt


class RecordTransformersLogs(logging.Handler):
    """Keeps every message transformers logs: its logger does not propagate to the root, so caplog misses it."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("vocab_size", [64, 50257])
def test_save_pretrained_loads_in_transformers(tmp_path, capfd, vocab_size):
    from transformers import GPT2LMHeadModel
    gpt = tiny_gpt(vocab_size=vocab_size).eval()
    save_pretrained(gpt, str(tmp_path))
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")  # tied: stored once

    handler = RecordTransformersLogs()
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hf, info = GPT2LMHeadModel.from_pretrained(str(tmp_path), attn_implementation="eager",
                                                       output_loading_info=True)
    finally:
        transformers_logger.removeHandler(handler)
    said = handler.messages + [str(w.message) for w in caught] + list(capfd.readouterr())
    complaints = [s for s in said if any(word in s.lower() for word in
                                         ("missing", "unexpected", "newly initialized", "mismatch"))]
    assert complaints == []
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]

    idx = random_tokens(vocab_size, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(idx).logits, gpt(idx), atol=1e-5, rtol=1e-5)


def test_unknown_model_name():
    message = one_line_user_error(lambda: load_pretrained("nonexistent_model_xyz"))
    assert "nonexistent_model_xyz" in message and "gpt2-medium" in message  # what was wrong, what works


def test_directory_without_weights(tmp_path):
    message = one_line_user_error(lambda: load_pretrained(str(tmp_path)))
    assert "config.json" in message
    make_hf_gpt2(tmp_path, **SMALL)
    os.remove(tmp_path / "model.safetensors")
    message = one_line_user_error(lambda: load_pretrained(str(tmp_path)))
    assert str(tmp_path) in message and "model.safetensors" in message


def test_hub_name_without_network(tmp_path, monkeypatch):
    from huggingface_hub import constants
    # an empty cache, so a gpt2 downloaded earlier on this machine cannot answer instead of the hub
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    message = one_line_user_error(lambda: load_pretrained("gpt2"))
    assert "hub" in message.lower() and "local directory" in message


def test_script_prints_one_error_line(tmp_path):
    result = run_script("sft.py", "--init", "nonexistent_model_xyz", "--data", "toy", "--max_iters", "1",
                        "--device", "cpu", "--out_dir", tmp_path / "out", timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nonexistent_model_xyz" in lines[0], \
        result.stderr
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_corrupt_model_files_are_one_line(tmp_path):
    make_hf_gpt2(tmp_path, n_positions=64, n_layer=1, n_head=2, n_embd=32)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_layer": "1"}))
    with pytest.raises(UserError, match="n_layer is '1', expected a positive whole number"):
        load_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(config))
    weights = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(weights[:len(weights) // 2])  # a torn download
    with pytest.raises(UserError, match="is not a readable safetensors file"):
        load_pretrained(str(tmp_path))


def test_weights_of_another_shape_are_refused_from_the_header(tmp_path):
    make_hf_gpt2(tmp_path, n_positions=64, n_layer=2, n_head=2, n_embd=32)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_embd": 64}))  # config and weights disagree
    message = one_line_user_error(lambda: load_pretrained(str(tmp_path)))
    assert "do not fit the model: transformer.wte.weight has shape (50257, 32) there, (50257, 64) here" in message


def test_a_run_folder_that_never_saved_says_so(tmp_path):
    (tmp_path / "log.jsonl").write_text('{"iter": 0, "split": "test", "loss": 10.8}\n')
    message = one_line_user_error(lambda: open_model(str(tmp_path)))
    assert "holds a run that never saved a checkpoint" in message


def test_a_trained_run_exports_to_a_directory_transformers_loads_with_its_tokenizer(sft_dir, tmp_path, capsys):
    # the documented command, on one of our run directories: weights, config and GPT-2's tokenizer files
    from transformers import AutoTokenizer, GPT2LMHeadModel
    from data import get_tokenizer
    export = tmp_path / "exported"
    models.main(["export", str(sft_dir), str(export)])
    assert "GPT2LMHeadModel.from_pretrained" in capsys.readouterr().out
    for name in ("config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (export / name).stat().st_mode & 0o777 == 0o666 & ~current_umask(), name  # as any new file here
    hf = GPT2LMHeadModel.from_pretrained(str(export), attn_implementation="eager").eval()
    ours = open_model(str(sft_dir)).eval()
    idx = random_tokens(50257, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx), atol=1e-5, rtol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(str(export))
    text = "\n\nHuman: Hi, I am Ana. How do I bake bread?\n\nAssistant: Sure, Ana.<|endoftext|>"
    assert tokenizer(text)["input_ids"] == get_tokenizer().encode(text, allowed_special="all")
    assert tokenizer.eos_token_id == 50256
    # a directory that holds anything is refused, and nothing in it is touched
    capsys.readouterr()
    line = refused(lambda: models.main(["export", str(sft_dir), str(export)]), capsys)
    assert "exists and is not an empty directory" in line


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
