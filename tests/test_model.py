"""model.py against its claims: the port equals transformers' GPT2LMHeadModel, weights go in and out in
Hugging Face's layout, the log-probs with labels and the KV cache change no numbers, checkpoints survive a crash,
and bad input gives one line a user can act on.

transformers is the oracle here only; the tiny random models it builds (conftest.make_hf_gpt2) stand
in for the real GPT-2 weights, which cannot be downloaded on these machines.
"""
import argparse
import json
import logging
import os
import warnings
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import model
from conftest import make_hf_gpt2, run_script
import runs
from model import GPT, GPT2_SIZES, GPTConfig
from runs import UserError

# Tiny GPT-2 shapes, as make_hf_gpt2 keyword arguments. A small vocabulary keeps most tests fast; the
# full 50257 catches anything that depends on the real vocabulary size (the head, <|endoftext|>).
SMALL = dict(vocab_size=64, n_positions=32, n_layer=2, n_head=2, n_embd=32)
ODD = dict(vocab_size=101, n_positions=32, n_layer=3, n_head=3, n_embd=48)  # nothing a power of two
FULL_VOCAB = dict(vocab_size=50257, n_positions=32, n_layer=2, n_head=4, n_embd=32)
CONFIGS = {"small": SMALL, "odd": ODD, "full_vocab": FULL_VOCAB}


def tiny_config(**overrides):
    """Our GPTConfig for the SMALL shape."""
    return GPTConfig(**{"block_size": 32, "vocab_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 32,
                        **overrides})


def tiny_gpt(seed=0, rough=True, **overrides):
    """Our GPT in the SMALL shape, the same weights every run (roughened, see below, unless rough=False)."""
    torch.manual_seed(seed)
    gpt = GPT(tiny_config(**overrides))
    return roughen(gpt, seed) if rough else gpt


def roughen(module, seed=0, scale=0.3):
    """Add N(0, scale^2) noise to every parameter, in place.

    At GPT-2's init (std 0.02, LayerNorm 1 and 0) a tiny model's activations stay near 0, where the
    tanh and exact GELUs agree to 1e-7, attention is nearly uniform and LayerNorm's bias is 0: a wrong
    GELU, mask or LayerNorm would still match transformers. Rough weights put every part to work.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return module


def rough_hf_gpt2(directory, **shape):
    """conftest.make_hf_gpt2, roughened and written again: the directory holds the rough weights."""
    hf = roughen(make_hf_gpt2(directory, **shape))
    hf.save_pretrained(str(directory))
    return hf


@pytest.fixture(scope="module", params=list(CONFIGS))
def hf_and_ours(request, tmp_path_factory):
    """The same random weights twice: in transformers (eager attention, fp32, eval) and loaded by us."""
    directory = tmp_path_factory.mktemp(request.param)
    hf = rough_hf_gpt2(directory, **CONFIGS[request.param])
    ours = GPT.from_pretrained(str(directory)).eval()
    return hf, ours


def random_tokens(vocab_size, shape, seed=0):
    return torch.randint(vocab_size, shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------
# The port: logits, loss and greedy tokens equal transformers'

def test_logits_equal_transformers(hf_and_ours):
    hf, ours = hf_and_ours
    idx = random_tokens(ours.config.vocab_size, (2, ours.config.block_size))  # the full context
    with torch.no_grad():
        logits = ours(idx)
        expected = hf(idx).logits
    assert logits.shape == (2, ours.config.block_size, ours.config.vocab_size)  # every position
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_next_token_loss_equals_transformers(hf_and_ours):
    hf, ours = hf_and_ours
    idx = random_tokens(ours.config.vocab_size, (2, 17), seed=1)
    with torch.no_grad():
        logits = ours(idx)
        # transformers shifts labels=idx itself: position t predicts token t + 1
        expected = hf(idx, labels=idx).loss
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), idx[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv_cache", "no_cache"])
def test_greedy_tokens_equal_transformers(hf_and_ours, use_cache):
    hf, ours = hf_and_ours
    idx = random_tokens(ours.config.vocab_size, (1, 5), seed=2)
    tokens = ours.generate(idx, 20, temperature=0, use_cache=use_cache)
    with torch.no_grad():
        expected = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=20, do_sample=False,
                               use_cache=use_cache, pad_token_id=0)
    assert tokens.tolist() == expected.tolist()
    assert tokens.size(1) == 25 or tokens[0, -1].item() == 50256  # 20 new tokens, unless <|endoftext|>


def test_generate_stops_at_block_size():
    # past block_size there is no position embedding: generate must stop there, not fail or wrap around
    gpt = tiny_gpt().eval()
    idx = random_tokens(64, (1, 29))
    for use_cache in (True, False):
        assert gpt.generate(idx, 20, temperature=0, use_cache=use_cache).shape == (1, 32)


def test_sampling_with_kv_cache_equals_without():
    gpt = tiny_gpt().eval()
    idx = random_tokens(64, (1, 4), seed=3)

    def sample(use_cache, seed):
        return gpt.generate(idx, 24, temperature=1.0, top_k=10, top_p=0.9, use_cache=use_cache,
                            generator=torch.Generator().manual_seed(seed)).tolist()

    assert sample(True, seed=0) == sample(False, seed=0)
    assert sample(True, seed=1) == sample(False, seed=1)
    assert sample(True, seed=0) != sample(True, seed=1)  # it really samples: the equality is not greedy's


def test_top_k_and_top_p_keep_only_their_tokens():
    gpt = tiny_gpt().eval()
    idx = random_tokens(64, (1, 4), seed=5)
    greedy = gpt.generate(idx, 8, temperature=0).tolist()
    generator = torch.Generator().manual_seed(0)
    # one token left by the filter: sampling must give the greedy tokens, whatever the random draws
    assert gpt.generate(idx, 8, top_k=1, generator=generator).tolist() == greedy
    assert gpt.generate(idx, 8, top_p=1e-6, generator=generator).tolist() == greedy

    # top_k 10 then top_p 0.9: the 10 likeliest tokens, renormalized, cut to the smallest set with mass >= 0.9
    with torch.no_grad():
        top = gpt(idx)[0, -1].topk(10)  # sorted, likeliest first
    probs = top.values.softmax(-1)
    nucleus = set(top.indices[:int((probs.cumsum(-1) < 0.9).sum()) + 1].tolist())
    first_tokens = {gpt.generate(idx, 1, top_k=10, top_p=0.9, generator=generator)[0, -1].item()
                    for _ in range(300)}
    assert len(nucleus) > 1 and first_tokens == nucleus, (probs, first_tokens, nucleus)


# ----------------------------------------------------------------------------------------------------
# the forward with labels: the response-only, chunked head gives the full head's numbers and gradients

def labels_for(idx, prompt_lengths, lengths):
    """data.py's convention: labels[t] = idx[t + 1] on response tokens, IGNORE_INDEX on prompt and padding."""
    labels = torch.full_like(idx, model.IGNORE_INDEX)
    for row, (prompt, length) in enumerate(zip(prompt_lengths, lengths)):
        labels[row, prompt - 1:length - 1] = idx[row, prompt:length]
    return labels


@pytest.mark.parametrize("rows_per_chunk", [None, 3], ids=["default_chunks", "3_rows_per_chunk"])
def test_label_log_probs_equal_full_log_softmax(monkeypatch, rows_per_chunk):
    if rows_per_chunk is not None:
        # a budget of 3 rows of logits: the chunk loop runs several times and ends on a partial chunk
        monkeypatch.setattr(model.LabelLogProbs, "BUDGET", {"cpu": rows_per_chunk * 4 * 64})
        assert model.LabelLogProbs.rows_per_chunk(torch.empty(64, 32)) == rows_per_chunk
    gpt = tiny_gpt()
    idx = random_tokens(64, (3, 16), seed=4)
    labels = labels_for(idx, prompt_lengths=[3, 8, 1], lengths=[16, 12, 9])  # the last two rows padded
    # an arbitrary weighted sum as the loss, so every position's gradient counts, each differently
    weights = torch.randn(labels.shape, generator=torch.Generator().manual_seed(0))

    logps = gpt(idx, labels)
    (logps * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in gpt.named_parameters()}
    gpt.zero_grad()
    expected = model.label_logps(gpt(idx), labels)  # the plain two-line version
    (expected * weights).sum().backward()

    assert logps.dtype == torch.float32 and logps.shape == labels.shape
    assert (logps[labels == model.IGNORE_INDEX] == 0).all()  # exactly zero, not merely small
    assert (logps[labels != model.IGNORE_INDEX] < 0).all()
    torch.testing.assert_close(logps, expected, atol=1e-5, rtol=1e-5)
    for name, p in gpt.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=f"gradient of {name}")


def test_label_log_probs_with_no_labelled_token():
    # a batch whose responses were all cut by truncation: zeros and a zero gradient, not a crash
    gpt = tiny_gpt()
    idx = random_tokens(64, (2, 8))
    logps = gpt(idx, torch.full_like(idx, model.IGNORE_INDEX))
    logps.sum().backward()
    assert (logps == 0).all()
    assert gpt.lm_head.weight.grad.abs().max() == 0


# ----------------------------------------------------------------------------------------------------
# Weights in and out in Hugging Face's layout

def test_load_from_transformers_save_pretrained(tmp_path):
    hf = rough_hf_gpt2(tmp_path, **SMALL)
    assert {"config.json", "model.safetensors"} <= set(os.listdir(tmp_path))
    assert all(k.startswith("transformer.") for k in load_file(tmp_path / "model.safetensors"))
    gpt = GPT.from_pretrained(str(tmp_path)).eval()
    idx = random_tokens(64, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(gpt(idx), hf(idx).logits, atol=1e-5, rtol=1e-5)


def test_load_hub_style_safetensors(tmp_path):
    # the hub's openai-community/gpt2 file: no "transformer." prefix, no lm_head.weight (tied), and the
    # causal-mask buffers attn.bias / attn.masked_bias that old transformers versions saved
    hf = rough_hf_gpt2(tmp_path / "hf", **SMALL)
    n = SMALL["n_positions"]
    state = {}
    for key, tensor in hf.state_dict().items():
        if key == "lm_head.weight":
            continue
        state[key.removeprefix("transformer.")] = tensor.clone().contiguous()
    for layer in range(SMALL["n_layer"]):
        state[f"h.{layer}.attn.bias"] = torch.ones(n, n, dtype=torch.uint8).tril().view(1, 1, n, n)
        state[f"h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    hub = tmp_path / "hub"
    hub.mkdir()
    save_file(state, str(hub / "model.safetensors"))
    (hub / "config.json").write_text(json.dumps({  # the hub's config.json, trimmed to our shape
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
        "n_ctx": n, "n_positions": n, "n_embd": SMALL["n_embd"], "n_head": SMALL["n_head"],
        "n_layer": SMALL["n_layer"], "vocab_size": SMALL["vocab_size"], "layer_norm_epsilon": 1e-5}))

    gpt = GPT.from_pretrained(str(hub)).eval()
    idx = random_tokens(64, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(gpt(idx), hf(idx).logits, atol=1e-5, rtol=1e-5)
    assert gpt.lm_head.weight is gpt.transformer.wte.weight  # still tied after loading


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
    gpt.save_pretrained(str(tmp_path))
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


# ----------------------------------------------------------------------------------------------------
# The published sizes

@pytest.mark.parametrize("name, count", [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
                                         ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)])
def test_published_parameter_counts(name, count):
    with torch.device("meta"):  # shapes only: gpt2-xl would otherwise allocate 6 GB
        gpt = GPT(GPTConfig(**GPT2_SIZES[name]))
    assert all(p.device.type == "meta" for p in gpt.parameters())
    assert gpt.num_params() == count


# ----------------------------------------------------------------------------------------------------
# Checkpoints

def trained_for_one_step():
    """A tiny model and an AdamW that has taken one step, so the optimizer has state to save."""
    gpt = tiny_gpt(rough=False)
    optimizer = runs.make_optimizer(gpt, lr=1e-3, weight_decay=0.1, device="cpu")
    idx = random_tokens(64, (2, 8))
    F.cross_entropy(gpt(idx)[:, :-1].reshape(-1, 64), idx[:, 1:].reshape(-1)).backward()
    optimizer.step()
    return gpt, optimizer


def test_checkpoint_has_plain_types_only(tmp_path):
    gpt, optimizer = trained_for_one_step()
    args = argparse.Namespace(lr=1e-3, data="toy", compile=False, out_dir=str(tmp_path), betas=[0.9, 0.95])
    rng_at_save = torch.get_rng_state()
    runs.save_checkpoint(str(tmp_path), gpt, optimizer, None, 7, args)

    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # fails if any class was pickled
    assert {"model", "config", "optimizer", "iter", "args", "rng"} <= set(checkpoint)
    assert type(checkpoint["config"]) is dict and checkpoint["config"] == asdict(gpt.config)
    assert checkpoint["iter"] == 7
    assert checkpoint["args"]["lr"] == 1e-3 and checkpoint["args"]["data"] == "toy"
    assert torch.equal(checkpoint["rng"]["cpu"], rng_at_save)
    assert checkpoint["optimizer"]["state"]  # AdamW's moments, not just the hyperparameters
    for key, tensor in gpt.state_dict().items():
        assert torch.equal(checkpoint["model"][key], tensor), key

    # and a checkpoint directory is something from_pretrained reads back, to the same logits
    restored = GPT.from_pretrained(str(tmp_path))
    idx = random_tokens(64, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(restored(idx), gpt(idx), atol=0, rtol=0)


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    gpt, optimizer = trained_for_one_step()
    args = argparse.Namespace(lr=1e-3)
    runs.save_checkpoint(str(tmp_path), gpt, optimizer, None, 1, args)

    written_to = []

    def crash_midway(obj, path, *rest, **kwargs):
        """torch.save that dies after writing part of the file, like a full disk or a killed job."""
        written_to.append(str(path))
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(runs.torch, "save", crash_midway)
    with pytest.raises(OSError, match="No space left"):
        runs.save_checkpoint(str(tmp_path), gpt, optimizer, None, 2, args)
    monkeypatch.undo()

    assert written_to and written_to[0] != str(tmp_path / "ckpt.pt")  # the partial bytes went elsewhere
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no .tmp left behind


# ----------------------------------------------------------------------------------------------------
# Bad input: one clear line, not a traceback

def one_line_user_error(call):
    with pytest.raises(UserError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message and message
    return message


def test_unknown_model_name():
    message = one_line_user_error(lambda: GPT.from_pretrained("nonexistent_model_xyz"))
    assert "nonexistent_model_xyz" in message and "gpt2-medium" in message  # what was wrong, what works


def test_directory_without_weights(tmp_path):
    message = one_line_user_error(lambda: GPT.from_pretrained(str(tmp_path)))
    assert "config.json" in message
    make_hf_gpt2(tmp_path, **SMALL)
    os.remove(tmp_path / "model.safetensors")
    message = one_line_user_error(lambda: GPT.from_pretrained(str(tmp_path)))
    assert str(tmp_path) in message and "model.safetensors" in message


def test_state_of_another_shape_names_the_key_and_both_shapes():
    gpt = tiny_gpt(rough=False)
    before = {k: v.clone() for k, v in gpt.state_dict().items()}

    bigger_vocab = tiny_gpt(rough=False, vocab_size=65).state_dict()
    message = one_line_user_error(lambda: gpt.load_weights(bigger_vocab, where="ckpt.pt"))
    assert "ckpt.pt" in message and "transformer.wte.weight" in message  # the first mismatch, in order
    assert "(65, 32)" in message and "(64, 32)" in message

    one_layer_off = dict(gpt.state_dict())
    one_layer_off["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(100, 32)
    message = one_line_user_error(lambda: gpt.load_weights(one_layer_off))
    assert "transformer.h.1.mlp.c_fc.weight" in message and "(100, 32)" in message and "(128, 32)" in message

    for key, tensor in gpt.state_dict().items():  # a refused state leaves the model as it was
        assert torch.equal(tensor, before[key]), key


def test_hub_name_without_network(tmp_path, monkeypatch):
    from huggingface_hub import constants
    # an empty cache, so a gpt2 downloaded earlier on this machine cannot answer instead of the hub
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    message = one_line_user_error(lambda: GPT.from_pretrained("gpt2"))
    assert "hub" in message.lower() and "local directory" in message


def test_script_prints_one_error_line(tmp_path):
    assert os.path.isfile(os.path.join(os.path.dirname(model.__file__), "sft.py"))
    result = run_script("sft.py", "--init", "nonexistent_model_xyz", "--data", "toy", "--max_iters", "1",
                        "--device", "cpu", "--out_dir", tmp_path / "out", timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nonexistent_model_xyz" in lines[0], \
        result.stderr
