"""GPT-2, written out: the transformer, its weights in and out of Hugging Face's layout, and sampling.

The module names equal Hugging Face's GPT-2 (`transformer.wte`, `transformer.h.0.attn.c_attn`, ...), so
importing the published weights is one renaming loop and four transposes. Numerics follow GPT-2 exactly
(tanh GELU, LayerNorm eps 1e-5, biases everywhere, tied input/output embeddings); tests/test_model.py
proves our logits equal `transformers.GPT2LMHeadModel`'s. Run plumbing (flags, checkpoints, logs) is
in runs.py.
"""
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from runs import UserError, atomic_write, load_checkpoint

IGNORE_INDEX = -100  # label of a position that is not trained on (prompt, padding): PyTorch's convention


# ----------------------------------------------------------------------------------------------------
# The transformer

@dataclass
class GPTConfig:
    block_size: int = 1024   # longest sequence (learned position embeddings)
    vocab_size: int = 50257  # GPT-2's BPE: 50,000 merges + 256 bytes + <|endoftext|>
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0     # GPT-2 was pretrained with 0.1; for fine-tuning 0 is the usual choice
    bias: bool = True        # GPT-2 has biases in every Linear and LayerNorm


# GPT-2's original code used Conv1D layers, whose weights are stored (in, out): nn.Linear wants (out, in)
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# The published GPT-2 sizes (Radford et al., 2019); all share block_size 1024 and vocab_size 50257.
GPT2_SIZES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),          # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),   # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),      # 1558M
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.layer = layer  # this block's slot in the KV cache
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, kv_cache=None, attn_mask=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        past = 0
        if kv_cache is not None:
            # sampling: keys and values of earlier tokens are kept, so each new token costs O(T), not O(T^2)
            if kv_cache[self.layer] is not None:
                past_k, past_v = kv_cache[self.layer]
                past = past_k.size(2)
                k = torch.cat([past_k, k], dim=2)  # (B, nh, past + T, hs)
                v = torch.cat([past_v, v], dim=2)
            kv_cache[self.layer] = (k, v)
        dropout = self.dropout if self.training else 0.0
        if attn_mask is not None:  # packed rows (data.packed_dpo_batch): who sees whom is given
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        elif past == 0:
            # the causal mask as one flag: SDPA then picks flash / memory-efficient kernels where it can
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:
            # new tokens after a cache: new token i sees the `past` cached tokens and new tokens <= i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # GPT-2 used the tanh approximation of GELU ("gelu_new" in transformers); the exact erf GELU
        # differs from it by up to 4.7e-4 (at |x| = 2.7), enough to break equality with the published model
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None, attn_mask=None):
        x = x + self.attn(self.ln_1(x), kv_cache, attn_mask)  # pre-norm residual blocks (GPT-2, sec. 2.3)
        return x + self.mlp(self.ln_2(x))


# ----------------------------------------------------------------------------------------------------
# The log-probability of each label: what SFT and DPO train on

def label_logps(logits, labels):
    """The plain version, two lines: log softmax over the vocabulary, then the entry of each label.
    (B, T) in fp32, 0 where the label is IGNORE_INDEX. GPT.forward with labels returns the same numbers
    (tests/test_model.py uses this function as its oracle) without building the (B, T, vocab) logits."""
    logps = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logps.masked_fill(labels == IGNORE_INDEX, 0.0)


class LabelLogProbs(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[row, target] for N rows, chunk by chunk: label_logps, made lean.

    label_logps keeps the (N, vocab) logits, a log-softmax copy and their gradients alive at once: for a
    DPO micro-batch of 8 x 512 tokens on GPT-2 that is several GB of fp32. Here one chunk of logits
    exists at a time; backward recomputes it (one more matmul) and turns it into the gradient in place,
    using d log p / d logits = onehot(target) - softmax.
    """
    # fp32 logits in flight at once. On CPU, 32 MB stays under glibc's largest mmap threshold, so a
    # freed chunk is reused instead of being returned to the OS and page-faulted back (PERFORMANCE.md
    # has the measurement); on a GPU, bigger chunks keep the matmuls large.
    BUDGET = {"cpu": 2**25, "cuda": 2**30}

    @staticmethod
    def rows_per_chunk(weight):
        return max(1, LabelLogProbs.BUDGET.get(weight.device.type, 2**25) // (4 * weight.size(0)))

    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype):
        exact = torch.promote_types(dtype, torch.float32)  # fp32 for the sums (fp64 stays fp64)
        logps = torch.empty(len(targets), dtype=exact, device=hidden.device)
        lse = torch.empty_like(logps)
        w = weight.to(dtype)
        chunk = LabelLogProbs.rows_per_chunk(weight)
        for s in range(0, len(targets), chunk):
            e = s + chunk
            logits = (hidden[s:e].to(dtype) @ w.t()).to(exact)  # (chunk, vocab)
            lse[s:e] = torch.logsumexp(logits, dim=1)
            logps[s:e] = logits.gather(1, targets[s:e, None]).squeeze(1) - lse[s:e]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.dtype = dtype
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, targets, lse = ctx.saved_tensors
        w = weight.to(ctx.dtype)
        grad_hidden = torch.empty_like(hidden)
        exact = lse.dtype
        grad_weight = torch.zeros(weight.shape, dtype=exact, device=weight.device)
        chunk = LabelLogProbs.rows_per_chunk(weight)
        for s in range(0, len(targets), chunk):
            e = s + chunk
            h = hidden[s:e].to(ctx.dtype)
            grad = (h @ w.t()).to(exact).sub_(lse[s:e, None]).exp_()  # softmax, (chunk, vocab), in place
            grad[torch.arange(len(grad), device=grad.device), targets[s:e]] -= 1  # softmax - onehot
            grad = grad.mul_(-grad_logps[s:e, None]).to(ctx.dtype)  # chain rule: d loss / d logits
            grad_hidden[s:e] = grad @ w
            grad_weight += (grad.t() @ h).to(exact)
        return grad_hidden, grad_weight.to(weight.dtype), None, None


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
            wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embeddings
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, layer) for layer in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: one matrix reads and writes tokens
        # Activation checkpointing (off by default): keep only each block's input in the forward pass and
        # recompute the block in backward. Same gradients; about a third more compute, far less memory.
        self.grad_checkpoint = False
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2 scales residual projections by 1/sqrt(2 * n_layer)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # the tied head is counted once

    def forward(self, idx, labels=None, positions=None, segments=None, kv_cache=None):
        """Without labels: the logits at every position, (B, T, vocab_size).

        With labels: log p(labels[b, t] | idx[b, :t+1]) where a label exists and 0 elsewhere, (B, T) in
        fp32: what SFT and DPO train on. Labels are already shifted (data.py: labels[t] is the token after
        idx[t]) and IGNORE_INDEX on prompt and padding. The numbers are the plain `label_logps(self(idx),
        labels)`, but the head runs only on labelled rows (for GPT-2 small the 768 x 50257 head is a third
        of the FLOPs per token, and prompts are often longer than responses), and the (rows, vocab)
        logits never exist whole: LabelLogProbs works through them in chunks.

        positions and segments (B, T) describe packed rows (data.packed_dpo_batch): token q attends to
        token k <= q when k is in segment 0 (the shared prompt) or in q's own segment; labels are then
        (2, B, T), one plane per response."""
        B, T = idx.size()
        past = 0 if kv_cache is None or kv_cache[0] is None else kv_cache[0][0].size(2)
        if positions is None:
            # lengths are checked where the data is made (load_model against --max_len, generate crops):
            # checking positions here would cost a GPU-to-CPU sync on every forward
            assert past + T <= self.config.block_size, f"{past + T} positions, block_size {self.config.block_size}"
            positions = torch.arange(past, past + T, dtype=torch.long, device=idx.device)  # (T,)
        attn_mask = None
        if segments is not None:
            query, key = segments[:, :, None], segments[:, None, :]  # (B, T, 1), (B, 1, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
            attn_mask = (causal & ((key == 0) | (key == query)))[:, None]  # (B, 1, T, T): one for all heads
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))  # (B, T, C)
        # only when a backward pass will follow: in eval or under no_grad there is nothing to save
        # (never with a KV cache: recomputing a block would append its keys and values a second time)
        recompute = self.grad_checkpoint and self.training and torch.is_grad_enabled() and kv_cache is None
        for block in self.transformer.h:
            if recompute:  # non-reentrant: works with autocast and compile; dropout masks are replayed
                x = checkpoint(block, x, kv_cache, attn_mask, use_reentrant=False)
            else:
                x = block(x, kv_cache, attn_mask)
        x = self.transformer.ln_f(x)  # (B, T, C)
        if labels is None:
            return self.lm_head(x)  # (B, T, vocab_size)

        mask = labels != IGNORE_INDEX  # (B, T), or (2, B, T) for packed rows
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        hidden = x.expand(*labels.shape, x.size(-1))[mask]  # (N, C); a position may serve two planes
        picked = LabelLogProbs.apply(hidden, self.lm_head.weight, labels[mask], dtype)  # (N,)
        return torch.zeros(labels.shape, dtype=picked.dtype, device=picked.device).masked_scatter(mask, picked)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 eos_token=50256, use_cache=True, generator=None, stop=None):
        """Continue idx (1, T) by up to max_new_tokens sampled tokens; returns (1, T + new).

        temperature 0 is greedy. top_k keeps the k likeliest tokens, top_p the smallest set whose
        probability reaches p (nucleus sampling). Stops after eos_token, when stop(new_token_ids) says
        so, or at block_size. With use_cache, earlier tokens' keys and values are kept (a KV cache).
        """
        assert idx.size(0) == 1, "generate samples one sequence at a time"
        max_new_tokens = min(max_new_tokens, self.config.block_size - idx.size(1))
        kv_cache = [None] * self.config.n_layer if use_cache else None
        new = []
        next_input = idx
        for _ in range(max_new_tokens):
            logits = self(next_input if use_cache else idx, kv_cache=kv_cache)[:, -1, :].float()  # (1, V)
            if temperature == 0:
                token = logits.argmax(dim=-1, keepdim=True)  # (1, 1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                if top_p is not None and top_p < 1.0:
                    sorted_logits, order = torch.sort(logits, descending=True)
                    cumulative = sorted_logits.softmax(-1).cumsum(-1)
                    drop = cumulative - sorted_logits.softmax(-1) >= top_p  # mass before this token already >= p
                    logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
                token = torch.multinomial(logits.softmax(-1), 1, generator=generator)  # (1, 1)
            idx = torch.cat([idx, token], dim=1)
            next_input = token
            new.append(token.item())
            if token.item() == eos_token or (stop is not None and stop(new)):
                break
        return idx

    # ------------------------------------------------------------------------------------------------
    # Weights in and out: Hugging Face's GPT-2 layout and our checkpoints

    @classmethod
    def from_pretrained(cls, name_or_dir, device="cpu"):
        """A GPT-2 name (downloaded from the hub), a Hugging Face directory, or one of our checkpoint dirs."""
        if name_or_dir in GPT2_SIZES:
            config = GPTConfig(**GPT2_SIZES[name_or_dir])
            weights = _download_weights(name_or_dir)
        elif os.path.isfile(os.path.join(name_or_dir, "ckpt.pt")):
            checkpoint = load_checkpoint(os.path.join(name_or_dir, "ckpt.pt"))
            model = cls(GPTConfig(**checkpoint["config"]))
            model.load_weights(checkpoint["model"], where=name_or_dir)
            return model.to(device)
        elif os.path.isdir(name_or_dir):
            config = _read_hf_config(name_or_dir)
            weights = os.path.join(name_or_dir, "model.safetensors")
            if not os.path.isfile(weights):
                raise UserError(f"{name_or_dir} has no model.safetensors (nor a ckpt.pt of ours); give a "
                                "directory written by save_pretrained, or a GPT-2 name")
        else:
            raise UserError(f"unknown model {name_or_dir!r}: use one of {', '.join(GPT2_SIZES)}, a Hugging "
                            "Face directory (config.json + model.safetensors) or a checkpoint directory")
        from safetensors.torch import load_file
        try:
            state = load_file(weights)
        except Exception as e:  # a torn download, a file that is not safetensors
            raise UserError(f"{weights} is not a readable safetensors file ({type(e).__name__}); download or "
                            "save it again") from None
        model = cls(config)
        model.load_weights(hf_to_ours(state, config), where=weights)
        return model.to(device)

    def load_weights(self, state, where="checkpoint"):
        """load_state_dict, after check_state has given any mismatch as one line."""
        check_state({k: v.shape for k, v in self.state_dict().items()}, state, f"the weights in {where}")
        self.load_state_dict(state)

    def save_pretrained(self, directory):
        """config.json + model.safetensors in Hugging Face's GPT-2 layout (GPT2LMHeadModel loads it)."""
        from safetensors.torch import save_file
        c = self.config
        config = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=c.vocab_size,
                      n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
                      n_inner=None, activation_function="gelu_new", layer_norm_epsilon=1e-5,
                      resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
                      tie_word_embeddings=True)
        if c.vocab_size > 50256:  # GPT-2's <|endoftext|> exists only in a full-size vocabulary
            config.update(bos_token_id=50256, eos_token_id=50256)
        weights = {}
        for key, tensor in self.state_dict().items():
            if key == "lm_head.weight":
                continue  # tied to transformer.wte.weight; the loader ties it again
            if key.endswith(CONV1D_WEIGHTS):
                tensor = tensor.t()  # back to Conv1D's (in, out)
            weights[key] = tensor.detach().to("cpu").contiguous()
        os.makedirs(directory, exist_ok=True)
        atomic_write(os.path.join(directory, "model.safetensors"), lambda path: save_file(weights, path))

        def write_config(path):
            with open(path, "w") as f:
                f.write(json.dumps(config, indent=2) + "\n")
        atomic_write(os.path.join(directory, "config.json"), write_config)


def load_model(init, device="cpu", dropout=0.0, max_len=None, scratch=None):
    """The model a training run starts from: GPT.from_pretrained(init), or for init "scratch" a fresh
    GPT with the GPTConfig fields in `scratch`. Dropout is a training choice, not part of the weights,
    so it is set here; max_len, the longest sequence the run will feed, must fit the position table."""
    model = GPT(GPTConfig(dropout=dropout, **scratch)) if init == "scratch" else GPT.from_pretrained(init)
    model.config.dropout = dropout
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = dropout
        if isinstance(module, CausalSelfAttention):
            module.dropout = dropout
    if max_len is not None and max_len > model.config.block_size:
        raise UserError(f"--max_len {max_len} is longer than {init}'s block_size {model.config.block_size}")
    return model.to(device)


def hf_to_ours(hf_state, config):
    """Map a Hugging Face GPT-2 state dict (either key layout) onto ours; checks every key and shape."""
    state = {}
    for key, tensor in hf_state.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers of old checkpoints, not weights
        if not key.startswith(("transformer.", "lm_head.")):
            key = "transformer." + key  # the hub's gpt2 files have no "transformer." prefix
        state[key] = tensor.t() if key.endswith(CONV1D_WEIGHTS) else tensor
    state.setdefault("lm_head.weight", state.get("transformer.wte.weight"))  # tied, often not stored
    with torch.device("meta"):  # shapes only: nothing allocated, nothing initialized
        expected = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    check_state(expected, state, f"weights for GPT-2 {config.n_layer} layers x {config.n_embd}")
    return state


def check_state(expected, state, where):
    """One line naming missing or unexpected keys, or the first key whose shape differs (both shapes)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(f"{where} do not fit the model: missing keys {missing[:3]}, unexpected keys {unexpected[:3]}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != tuple(shape):
            raise UserError(f"{where} do not fit the model: {key} has shape {tuple(state[key].shape)} there, "
                            f"{tuple(shape)} here")


def _read_hf_config(directory):
    path = os.path.join(directory, "config.json")
    try:
        with open(path) as f:
            hf = json.load(f)
        fields = dict(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                      n_head=hf["n_head"], n_embd=hf["n_embd"])
    except FileNotFoundError:
        raise UserError(f"{directory} has no config.json; give a directory written by save_pretrained, "
                        "a checkpoint directory, or a GPT-2 name") from None
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a GPT-2 config ({type(e).__name__}: {e})") from None
    for name, value in fields.items():
        if type(value) is not int or value < 1:  # bool is an int to Python, not here
            raise UserError(f"{path}: {name} is {value!r}, expected a positive whole number")
    if fields["n_embd"] % fields["n_head"]:
        raise UserError(f"{path}: n_embd {fields['n_embd']} is not a multiple of n_head {fields['n_head']}")
    return GPTConfig(**fields)


def _download_weights(name):
    """Path of name's model.safetensors in the hub cache, downloading it on first use."""
    from huggingface_hub import hf_hub_download
    try:
        return hf_hub_download(repo_id=f"openai-community/{name}", filename="model.safetensors")
    except Exception as e:  # offline, DNS failure, proxy: all say the same to the user
        raise UserError(f"could not download {name} from the Hugging Face hub ({type(e).__name__}); "
                        "check the network, or pass a local directory with config.json and "
                        "model.safetensors") from None
