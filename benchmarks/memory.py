"""The memory of a DPO step, computed: bf16 autocast on a GPU, every term counted from the shapes, and the
table of which GPT-2 fits which card, with model.py's plain output layer (the default) and with --chunked_head.
tests/test_memory.py checks the activation term byte for byte against what autograd keeps, and
benchmarks/memory_check.py the whole peak against Linux's measured one.

    python -m benchmarks.memory                          # 8 pairs x 512 tokens, gpt2 to gpt2-xl
    python -m benchmarks.memory --batch_size 4 --seq_len 1024
"""
import torch

from machinery.cli import ArgumentParser, HelpFormatter, at_least, description, fraction, user_errors
from machinery.fast import LabelLogProbs
from model import GPT2_SIZES, GPTConfig

CARDS_GIB = (24, 40, 80)
USABLE = 0.9  # of a card's memory: the CUDA context, cuBLAS workspaces and allocator fragmentation take the rest


def parameter_count(config):
    """All weights, the tied head counted once (124,439,808 for gpt2)."""
    C = config.n_embd
    per_block = 12 * C * C + 13 * C  # c_attn 3C^2 + 3C, c_proj C^2 + C, c_fc 4C^2 + 4C, c_proj 4C^2 + C, 2 LayerNorms 4C
    return config.vocab_size * C + config.block_size * C + config.n_layer * per_block + 2 * C  # + ln_f


def block_bytes_per_token(config, matmul_bytes=2, grad_checkpoint=False):
    """Bytes one block keeps for backward per token. matmul_bytes: 2 under bf16/fp16 autocast (the
    matmuls' inputs are kept in that precision), 4 in fp32; the residual stream and LayerNorms stay fp32."""
    C, fp32 = config.n_embd, 4
    if grad_checkpoint:
        return fp32 * C  # the block's input: the rest is recomputed in backward
    return (2 * fp32 * C             # ln_1 and ln_2 inputs (the residual stream)
            + 14 * matmul_bytes * C  # c_attn input, q k v (3C), attention output = c_proj input (one tensor),
                                     # c_fc input, GELU input (4C), MLP c_proj input (4C)
            + 2 * 2 * fp32           # each LayerNorm's mean and 1/std
            + config.n_head * fp32)  # attention's log-sum-exp, per head


def activation_bytes(config, rows, seq_len, labelled, matmul_bytes=2, grad_checkpoint=False, chunked_head=False):
    """Bytes the policy's forward keeps for backward on `rows` x `seq_len` tokens (stacked rows), of which
    `labelled` go through the head. Autocast's bf16 copies of the blocks' weights are not in here
    (memory_terms has them)."""
    tokens, fp32, index = rows * seq_len, 4, 8
    C, V = config.n_embd, config.vocab_size
    blocks = config.n_layer * block_bytes_per_token(config, matmul_bytes, grad_checkpoint) * tokens
    outside = (index + fp32 * C + 2 * fp32 + 1) * tokens  # token ids, ln_f input, mean, 1/std, label mask
    positions = index * seq_len
    if chunked_head:  # LabelLogProbs: hidden state, target, log-sum-exp
        head = (fp32 * C + index + fp32) * labelled
    else:  # GPT.label_logps: the head's input, the log-softmax's fp32 output, the targets; under autocast the
        # head's weight in bf16 too (the matmul keeps it)
        head = (matmul_bytes * C + fp32 * V + index) * labelled + (matmul_bytes * V * C if matmul_bytes < 4 else 0)
    return blocks + outside + positions + head


def saved_activation_bytes(model, batch, autocast):
    """Measured: bytes of the distinct storages autograd keeps for backward in one forward pass with
    labels, the weights themselves excluded (their autocast copies included). Checks activation_bytes."""
    storages = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor), autocast:
        model(*batch).sum()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(size for pointer, size in storages.items() if pointer not in weights)


def head_scratch_bytes(config, chunk_rows, matmul_bytes=2, chunked_head=True, reference=True):
    """(forward, backward): the most the output layer holds at once beyond its saved tensors. Plain
    (GPT.label_logps, on chunk_rows = all labelled rows): forward, the last head to run's logits and their fp32
    copy under autocast, and, when that is the reference's (which keeps nothing), its log-softmax too (the
    policy's is a saved activation); backward, the gradient the label lookup (gather) sends back and the one
    log-softmax's backward makes, both (rows, V) in fp32.
    Chunked (LabelLogProbs), for chunks of chunk_rows rows: forward, the fp32 logits and logsumexp's exp(logits - max), both (rows, V).
    Backward: the head's fp32 gradient accumulator (V, C), then either the fp32 chunk gradient and its
    matmul-precision copy, or that copy with the (V, C) weight-gradient product and its fp32 copy. Under
    bf16 the head's weights are cast once more (w); in fp32 none of the copies exist."""
    V, C = config.vocab_size, config.n_embd
    cast = matmul_bytes < 4
    if not chunked_head:
        return chunk_rows * V * (matmul_bytes + 4 * cast + 4 * reference), 8 * chunk_rows * V
    w = matmul_bytes * V * C if cast else 0
    forward = w + 8 * chunk_rows * V
    backward = w + 4 * V * C + max(4 * chunk_rows * V + cast * matmul_bytes * chunk_rows * V,
                                   matmul_bytes * chunk_rows * V + matmul_bytes * V * C + cast * 4 * V * C)
    return forward, backward


def memory_terms(config, batch_pairs, seq_len, response_frac, reference=True, grad_checkpoint=False,
                 matmul_bytes=2, fused_optimizer=True, chunked_head=False, chunk_budget=LabelLogProbs.BUDGET["cuda"]):
    """The terms of a stacked DPO step's memory (bytes) and its peak, the largest of four moments: the
    end of the forward passes (the reference's head last), the start of backward (the policy's head
    first), the end of backward, and the optimizer step. matmul_bytes 2: bf16 autocast, the reference
    cast to bf16 (dpo.freeze on a GPU); 4: fp32 throughout. fused_optimizer: AdamW(fused=True), as sft.py
    and dpo.py make it on a GPU; without it torch's AdamW makes temporaries the size of a weight.
    chunked_head: --chunked_head's LabelLogProbs instead of model.py's plain head."""
    P = parameter_count(config)
    C, V = config.n_embd, config.vocab_size
    rows, tokens = 2 * batch_pairs, 2 * batch_pairs * seq_len
    labelled = rows * round(seq_len * response_frac)
    chunk_rows = min(labelled, max(1, chunk_budget // (4 * V))) if chunked_head else labelled
    one_block = block_bytes_per_token(config, matmul_bytes) * tokens
    head_forward, head_backward = head_scratch_bytes(config, chunk_rows, matmul_bytes, chunked_head, reference)
    terms = {
        "weights and AdamW moments": 4 * P + 8 * P,  # fp32 master weights, exp_avg, exp_avg_sq
        "reference": matmul_bytes * P if reference else 0,
        # autocast's bf16 casts of the blocks' matmul weights: cached until the forward passes end, and kept
        # for backward by the matmuls, unless --grad_checkpoint recomputes (and recasts) them there
        "bf16 weight copies": 2 * 12 * config.n_layer * C * C if matmul_bytes < 4 else 0,
        "activations": activation_bytes(config, rows, seq_len, labelled, matmul_bytes, grad_checkpoint, chunked_head),
        "head scratch, forward": head_forward,
        "head scratch, backward": head_backward,
        "gradients": 4 * P,  # fp32; all of them exist only at the end of backward
        # the larger of: the token embedding's gradient from the lookup (V, C), beside the head's until the
        # two are summed; the first block's activations (kept or recomputed) and the MLP's two (tokens, 4C)
        # gradients
        "end of backward": max(4 * V * C + 4 * C * tokens, one_block + 2 * 4 * C * matmul_bytes * tokens),
        "optimizer scratch": 0 if fused_optimizer else 2 * 4 * V * C,  # sqrt and division of the largest weight
    }
    resting = terms["weights and AdamW moments"] + terms["reference"]
    kept = terms["activations"] + (0 if grad_checkpoint else terms["bf16 weight copies"])
    moments = {
        "end of forward": resting + terms["bf16 weight copies"] + terms["activations"] + head_forward,
        "start of backward": resting + kept + head_backward,
        "end of backward": resting + terms["gradients"] + terms["end of backward"],
        "optimizer step": resting + terms["gradients"] + terms["optimizer scratch"],
    }
    return terms, max(moments.values())


MEMORY_MODES = (("reference live", True, False), ("--precompute_ref", False, False),
                ("--grad_checkpoint", True, True), ("--grad_checkpoint --precompute_ref", False, True))


def memory_table(batch_pairs=8, seq_len=512, response_frac=0.5, chunked_head=False):
    """Rows (size, mode, peak GiB, cards it fits) for every GPT-2 size and memory mode."""
    rows = []
    for name, shape in GPT2_SIZES.items():
        config = GPTConfig(**shape)
        for mode, reference, grad_checkpoint in MEMORY_MODES:
            _, peak = memory_terms(config, batch_pairs, seq_len, response_frac, reference, grad_checkpoint,
                                   chunked_head=chunked_head)
            gib = peak / 2**30
            fits = [card for card in CARDS_GIB if gib <= USABLE * card]
            rows.append({"model": name, "mode": mode, "peak_gib": gib, "fits": fits})
    return rows


def print_memory_table(args):
    head = "--chunked_head" if args.chunked_head else "the plain output layer"
    print(f"DPO step, {args.batch_size} pairs x {args.seq_len} tokens (stacked rows, {args.response_frac:.0%} "
          f"response), bf16 autocast, AdamW, {head}; computed, not measured; a card fits at <= {USABLE:.0%} of its "
          "memory")
    print("| model | mode | peak (GiB) | " + " | ".join(f"{card} GB" for card in CARDS_GIB) + " |")
    print("|---|---|---:|" + ":---:|" * len(CARDS_GIB))
    for row in memory_table(args.batch_size, args.seq_len, args.response_frac, args.chunked_head):
        marks = " | ".join("yes" if card in row["fits"] else "no" for card in CARDS_GIB)
        print(f"| {row['model']} | {row['mode']} | {row['peak_gib']:.1f} computed | {marks} |")


def main(argv=None):
    p = ArgumentParser(prog="python -m benchmarks.memory", description=description(__doc__), formatter_class=HelpFormatter)
    p.add_argument("--batch_size", type=at_least(1), default=8, help="pairs per micro-batch")
    p.add_argument("--seq_len", type=at_least(2), default=512, help="tokens in every sequence (prompt + one response)")
    p.add_argument("--response_frac", type=fraction(0, 1), default=0.5, help="the share of each sequence that is response")
    p.add_argument("--chunked_head", action="store_true", help="the output layer chunk by chunk, as the training "
                   "scripts' --chunked_head (default: model.py's plain head)")
    args = p.parse_args(argv)
    with user_errors():
        print_memory_table(args)


if __name__ == "__main__":
    main()
