"""GPT-2, written out: the transformer, the log-probability of labels, and sampling.

Module names equal Hugging Face's (`transformer.h.0.attn.c_attn`, ...), so OpenAI's weights load with one renaming
loop and four transposes (machinery/models.py); the numerics are GPT-2's (tanh GELU, LayerNorm eps 1e-5, tied
embeddings), and tests/test_model.py proves our logits equal `transformers.GPT2LMHeadModel`'s."""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # the label of a position that is not trained on (prompt, padding): PyTorch's convention


@dataclass
class GPTConfig:
    block_size: int = 1024   # longest sequence (learned position embeddings)
    vocab_size: int = 50257  # GPT-2's BPE: 50,000 merges + 256 bytes + <|endoftext|>
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0     # GPT-2 was pretrained with 0.1; for fine-tuning 0 is the usual choice


# The published GPT-2 sizes (Radford et al., 2019); all share block_size 1024 and vocab_size 50257.
GPT2_SIZES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),          # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),   # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),      # 1558M
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.layer_idx = layer_idx  # this block's slot in a KV cache (see forward)
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, kv_cache=None, attn_mask=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        past = 0
        if kv_cache is not None:  # sampling: keep the keys and values seen so far; each new token runs alone
            if kv_cache[self.layer_idx] is not None:
                past_k, past_v = kv_cache[self.layer_idx]
                past = past_k.size(2)
                k = torch.cat([past_k, k], dim=2)  # (B, nh, past + T, hs)
                v = torch.cat([past_v, v], dim=2)
            kv_cache[self.layer_idx] = (k, v)
        dropout = self.dropout if self.training else 0.0
        # no mask: causal, as one flag (scaled_dot_product_attention then picks flash kernels); a mask says who sees whom
        # (generate's padded rows, machinery/fast.py's packed rows) and must be given after a KV cache
        assert attn_mask is not None or past == 0, "after a KV cache the mask must be given (generate gives it)"
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # GPT-2 used the tanh approximation of GELU ("gelu_new" in transformers); the exact erf GELU
        # differs from it by up to 4.7e-4 (at |x| = 2.7), enough to break equality with the published model
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None, attn_mask=None):
        x = x + self.attn(self.ln_1(x), kv_cache, attn_mask)  # pre-norm residual blocks (GPT-2, sec. 2.3)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
            wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embeddings
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, layer_idx) for layer_idx in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=1e-5),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: one matrix reads and writes tokens
        # --grad_checkpoint: keep only each block's input, recompute the block in backward (less memory)
        self.grad_checkpoint = False
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2 scales residual projections by 1/sqrt(2 * n_layer)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):  # GPT-2's: N(0, 0.02) weights, zero biases
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, labels=None, positions=None, attn_mask=None, kv_cache=None):
        """Without labels: the logits at every position, (B, T, vocab_size).

        With labels (already shifted: labels[t] is the token after idx[t], data.py): log p(labels[t]) at every
        position, in labels' shape and fp32, 0 where the label is IGNORE_INDEX: what SFT and DPO train on.
        positions and attn_mask, when given, replace 0..T-1 and the causal mask (generate's padded, packed rows)."""
        x = self.hidden_states(idx, positions, attn_mask, kv_cache)  # (B, T, C)
        if labels is None:
            return self.lm_head(x)  # (B, T, vocab_size)
        return self.label_logps(x, labels)

    def label_logps(self, x, labels):
        """log softmax over the vocabulary, then the entry of each label. The head runs on the labelled positions
        only: the logits of the others would be thrown away, and on the toy task they are most of the work.
        labels may also be (2, B, T), two planes of labels over the same rows (--share_prompt's packed pairs)."""
        trained = labels != IGNORE_INDEX  # (B, T)
        hidden = x.expand(*labels.shape, x.size(-1))[trained]  # (N, C): the labelled positions only
        logits = self.lm_head(hidden)  # (N, vocab)
        wide = torch.promote_types(logits.dtype, torch.float32)  # fp32 even under autocast (or fp64): exact sums
        logps = logits.log_softmax(-1, dtype=wide).gather(-1, labels[trained].unsqueeze(-1)).squeeze(-1)  # (N,)
        return torch.zeros(labels.shape, dtype=wide, device=x.device).masked_scatter(trained, logps)  # 0 elsewhere

    def hidden_states(self, idx, positions=None, attn_mask=None, kv_cache=None):
        """The transformer without its head: the final LayerNorm's output at every position, (B, T, C)."""
        B, T = idx.size()
        past = 0 if kv_cache is None or kv_cache[0] is None else kv_cache[0][0].size(2)
        if positions is None:  # given positions are checked where the data is made (a check here would sync the GPU)
            assert past + T <= self.config.block_size, f"{past + T} positions, block_size {self.config.block_size}"
            positions = torch.arange(past, past + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))  # (B, T, C)
        # recompute blocks only when a backward pass follows (never with a KV cache: it would grow twice)
        recompute = self.grad_checkpoint and self.training and torch.is_grad_enabled() and kv_cache is None
        for block in self.transformer.h:
            if recompute:  # non-reentrant: works with autocast and compile; dropout masks are replayed
                x = checkpoint(block, x, kv_cache, attn_mask, use_reentrant=False)
            else:
                x = block(x, kv_cache, attn_mask)
        return self.transformer.ln_f(x)

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generators=None,
                 stop=None, eos_token=50256):
        """Continue every prompt (a list of token ids) at once; returns each one's new tokens. A row stops after
        eos_token, when stop(its new tokens) says so, or at block_size. Shorter prompts are padded on the left and
        masked out; with a torch.Generator a row, each row gets what it would get alone (tests/test_model.py)."""
        device, longest = self.transformer.wte.weight.device, max(len(p) for p in prompts)
        max_new_tokens = min(max_new_tokens, self.config.block_size - longest)
        # (B, T), padded on the left with token 0: any id would do, the padding is masked out of attention
        idx = torch.tensor([[0] * (longest - len(p)) + list(p) for p in prompts], device=device)
        real = torch.tensor([[False] * (longest - len(p)) + [True] * len(p) for p in prompts], device=device)
        kv_cache = [None] * self.config.n_layer
        new, done = [[] for _ in prompts], [False] * len(prompts)
        start = 0  # the first position this step runs: all of them at first, then only the new token
        for _ in range(max_new_tokens):
            positions = (real.cumsum(1) - 1).clamp(min=0)  # (B, T): 0 at each row's first real token
            keys = torch.arange(real.size(1), device=device)
            queries = keys[start:, None]  # (T - start, 1)
            # a query sees the real tokens up to itself, and itself (so that a padding query sees one key)
            sees = (keys <= queries) & (real[:, None, :] | (keys == queries))  # (B, T - start, T)
            hidden = self.hidden_states(idx[:, start:], positions[:, start:], sees[:, None], kv_cache)
            logits = self.lm_head(hidden[:, -1]).float()  # (B, vocab): the head on the last position only
            tokens = sample_tokens(logits, temperature, top_k, top_p, generators)
            for row, token in enumerate(tokens):
                if not done[row]:
                    new[row].append(token)
                    done[row] = token == eos_token or (stop is not None and stop(new[row]))
            if all(done):
                break
            idx = torch.cat([idx, torch.tensor(tokens, device=device)[:, None]], dim=1)
            real = torch.cat([real, torch.ones(len(prompts), 1, dtype=torch.bool, device=device)], dim=1)
            start = idx.size(1) - 1
        return new


def param_groups(model, weight_decay):
    """The optimizer's parameter groups: weight decay on the matrices only, none on biases and LayerNorms."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def sample_tokens(logits, temperature, top_k, top_p, generators):
    """One token per row of logits (B, vocab): greedy at temperature 0, else sampled from the k likeliest
    (top_k) or the likeliest that make up probability p (top_p, nucleus sampling), a generator a row."""
    if temperature == 0:
        return logits.argmax(-1).tolist()
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # the mass before this token already reaches p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    # inverse-CDF sampling: a uniform draw per row, and the first token whose cumulative probability passes it
    cdf = logits.softmax(-1).cumsum(-1)  # (B, vocab)
    draws = [torch.rand((), generator=g, device=logits.device) for g in (generators or [None] * len(logits))]
    uniform = torch.stack(draws)[:, None] * cdf[:, -1:]  # (B, 1), scaled to the cdf's total (1, up to rounding)
    return torch.searchsorted(cdf, uniform, right=True).clamp(max=logits.size(-1) - 1).squeeze(1).tolist()
