"""model.py against its claims: the port equals transformers' GPT2LMHeadModel, Hugging Face's weights load,
the KV cache and batched sampling change no tokens, and the published sizes have their parameter counts.

transformers is the oracle here only; the tiny random models it builds (conftest.make_hf_gpt2) stand in for
the real GPT-2 weights, so the tests need no download.
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import model
from conftest import make_hf_gpt2
from machinery.models import load_pretrained
from model import GPT, GPT2_SIZES, GPTConfig

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
    ours = load_pretrained(str(directory)).eval()
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


@pytest.mark.parametrize("use_cache", [True, False], ids=["hf_kv_cache", "hf_no_cache"])
def test_greedy_tokens_equal_transformers(hf_and_ours, use_cache):
    hf, ours = hf_and_ours
    idx = random_tokens(ours.config.vocab_size, (1, 5), seed=2)
    new = ours.generate([idx[0].tolist()], 20, temperature=0)[0]  # ours with its KV cache
    with torch.no_grad():
        expected = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=20, do_sample=False,
                               use_cache=use_cache, pad_token_id=0)
    assert idx[0].tolist() + new == expected[0].tolist()
    assert len(new) == 20 or new[-1] == 50256  # 20 new tokens, unless <|endoftext|>


def test_generate_stops_at_block_size():
    # past block_size there is no position embedding: generate must stop there, not fail or wrap around
    gpt = tiny_gpt().eval()
    prompt = random_tokens(64, (29,)).tolist()
    assert len(gpt.generate([prompt], 20, temperature=0)[0]) == 32 - 29


def sample(gpt, prompts, seeds, n=24, **kwargs):
    return gpt.generate(prompts, n, generators=[torch.Generator().manual_seed(s) for s in seeds], **kwargs)


def without_a_cache(gpt, prompt, seed, n, **kwargs):
    """The slow oracle of generate: the whole sequence through the model again for every new token."""
    idx, generator = list(prompt), torch.Generator().manual_seed(seed)
    for _ in range(n):
        with torch.no_grad():
            logits = gpt(torch.tensor([idx]))[:, -1].float()
        idx += model.sample_tokens(logits, 1.0, kwargs.get("top_k"), kwargs.get("top_p"), [generator])
    return idx[len(prompt):]


def test_sampling_with_the_kv_cache_equals_sampling_without_it():
    gpt = tiny_gpt().eval()
    prompt = random_tokens(64, (4,), seed=3).tolist()
    for seed in (0, 1):
        assert sample(gpt, [prompt], [seed], top_k=10, top_p=0.9)[0] == without_a_cache(gpt, prompt, seed, 24, top_k=10,
                                                                                        top_p=0.9)
    assert sample(gpt, [prompt], [0]) != sample(gpt, [prompt], [1])  # it really samples: not greedy's equality


def test_a_batch_gives_each_row_what_it_would_get_alone():
    """Prompts of four lengths at once, left-padded: each row's tokens equal one-at-a-time sampling with
    the same per-row seed, sampled and greedy, and each row stops on its own."""
    gpt = tiny_gpt().double().eval()  # fp64: the padded batch and the single row round alike
    prompts = [random_tokens(64, (n,), seed=n).tolist() for n in (3, 9, 1, 6)]
    seeds = [100, 101, 102, 103]
    alone = [sample(gpt, [p], [s], n=12)[0] for p, s in zip(prompts, seeds)]
    assert sample(gpt, prompts, seeds, n=12) == alone
    assert len({tuple(row) for row in alone}) == 4  # rows differ: a mix-up between rows would show
    greedy_alone = [gpt.generate([p], 12, temperature=0)[0] for p in prompts]
    assert gpt.generate(prompts, 12, temperature=0) == greedy_alone
    # a row stops at its own end-of-text token (here token 7) or stop(), the others go on
    stopped = sample(gpt, prompts, seeds, n=12, eos_token=7, stop=lambda new: len(new) == 5 and new[0] % 2 == 0)
    for row, full in zip(stopped, alone):
        ends = [i + 1 for i, t in enumerate(full) if t == 7] + ([5] if full[0] % 2 == 0 else []) + [len(full)]
        assert row == full[:min(ends)]


def test_top_k_and_top_p_keep_only_their_tokens():
    gpt = tiny_gpt().eval()
    prompt = random_tokens(64, (4,), seed=5).tolist()
    greedy = gpt.generate([prompt], 8, temperature=0)
    # one token left by the filter: sampling must give the greedy tokens, whatever the random draws
    assert sample(gpt, [prompt], [0], n=8, top_k=1) == greedy
    assert sample(gpt, [prompt], [0], n=8, top_p=1e-6) == greedy

    # top_k 10 then top_p 0.9: the 10 likeliest tokens, renormalized, cut to the smallest set with mass >= 0.9
    with torch.no_grad():
        top = gpt(torch.tensor([prompt]))[0, -1].topk(10)  # sorted, likeliest first
    probs = top.values.softmax(-1)
    nucleus = set(top.indices[:int((probs.cumsum(-1) < 0.9).sum()) + 1].tolist())
    first_tokens = {token for seed in range(300) for token in sample(gpt, [prompt], [seed], n=1, top_k=10, top_p=0.9)[0]}
    assert len(nucleus) > 1 and first_tokens == nucleus, (probs, first_tokens, nucleus)


# ----------------------------------------------------------------------------------------------------
# The forward with labels: the head on labelled positions only gives the full head's numbers and gradients

def labels_for(idx, prompt_lengths, lengths):
    """data.py's convention: labels[t] = idx[t + 1] on response tokens, IGNORE_INDEX on prompt and padding."""
    labels = torch.full_like(idx, model.IGNORE_INDEX)
    for row, (prompt, length) in enumerate(zip(prompt_lengths, lengths)):
        labels[row, prompt - 1:length - 1] = idx[row, prompt:length]
    return labels


def test_the_forward_with_labels_equals_log_softmax_of_the_full_logits():
    gpt = tiny_gpt()
    idx = random_tokens(64, (3, 16), seed=4)
    labels = labels_for(idx, prompt_lengths=[3, 8, 1], lengths=[16, 12, 9])  # the last two rows padded
    weights = torch.randn(labels.shape, generator=torch.Generator().manual_seed(0))  # every position counts
    logps = gpt(idx, labels)
    grads = torch.autograd.grad((logps * weights).sum(), list(gpt.parameters()))
    # the textbook version: all T positions through the head, log-softmax, the label's entry, masked
    full = F.log_softmax(gpt(idx), dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected = full.masked_fill(labels == model.IGNORE_INDEX, 0.0)
    expected_grads = torch.autograd.grad((expected * weights).sum(), list(gpt.parameters()))
    assert logps.dtype == torch.float32 and logps.shape == labels.shape
    assert (logps[labels == model.IGNORE_INDEX] == 0).all()  # exactly zero, not merely small
    torch.testing.assert_close(logps, expected, atol=1e-5, rtol=1e-5)
    for (name, _), a, b in zip(gpt.named_parameters(), grads, expected_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=f"gradient of {name}")


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
    gpt = load_pretrained(str(tmp_path)).eval()
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

    gpt = load_pretrained(str(hub)).eval()
    idx = random_tokens(64, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(gpt(idx), hf(idx).logits, atol=1e-5, rtol=1e-5)
    assert gpt.lm_head.weight is gpt.transformer.wte.weight  # still tied after loading


# ----------------------------------------------------------------------------------------------------
# The published sizes

@pytest.mark.parametrize("name, count", [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
                                         ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)])
def test_published_parameter_counts(name, count):
    with torch.device("meta"):  # shapes only: gpt2-xl would otherwise allocate 6 GB
        gpt = GPT(GPTConfig(**GPT2_SIZES[name]))
    assert all(p.device.type == "meta" for p in gpt.parameters())
    assert sum(p.numel() for p in gpt.parameters()) == count  # the tied head counted once


