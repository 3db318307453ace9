"""The fixed DPO workload of the TRL comparison: 400 real HH-RLHF pairs and a random GPT-2-architecture
checkpoint, the same for both systems measured.

- pairs.jsonl: the first 400 pairs of the shipped excerpt (examples/hh-rlhf-harmless-base) whose prompt +
  longer response + EOS fit in 256 GPT-2 tokens, as {"prompt", "chosen", "rejected"} text, split by
  data.py's HH rules. Nothing is truncated, so both systems train on exactly these tokens.
- gpt2-6x384/: GPT-2's architecture at 6 layers x 384 wide (6 heads) with its full 50,257-token
  vocabulary and 1,024 positions, random weights (seed 0), written by transformers in Hugging Face
  layout, plus GPT-2's vocab.json and merges.txt (from tiktoken's files) for TRL's tokenizer.

    python -m benchmarks.workload out/trl-workload      # builds it (compare_trl.py does this itself)
"""
import gzip
import json
import os
import sys

from data import HH, get_tokenizer
from machinery import UserError
from machinery.files import write_text
from machinery.cli import user_errors
from machinery.formats import records_to_pairs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXCERPT = os.path.join(ROOT, "examples", "hh-rlhf-harmless-base", "test.jsonl.gz")
N_PAIRS = 400
MAX_TOKENS = 256
SHAPE = dict(n_layer=6, n_head=6, n_embd=384)
CHECKPOINT = "gpt2-6x384"
# GPT-2's tokenizer files as OpenAI published them (tiktoken's "gpt2" encoding reads the same two files,
# checked against these SHA-256s); Hugging Face's GPT-2 tokenizer is these files renamed
TOKENIZER_FILES = {
    "vocab.json": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                   "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "merges.txt": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                   "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
}


def hh_pairs(n=N_PAIRS, max_tokens=MAX_TOKENS, path=EXCERPT):
    """The first n pairs of the excerpt, in file order, that fit in max_tokens with the EOS dpo.py adds."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    _, outcomes = records_to_pairs(records, HH)
    pairs = [outcome for outcome in outcomes if isinstance(outcome, dict)]  # the rest are reasons for a drop
    encode = get_tokenizer().encode_ordinary_batch
    lengths = zip(*(map(len, encode([pair[field] for pair in pairs])) for field in ("prompt", "chosen", "rejected")))
    fitting = [pair for pair, (p, c, r) in zip(pairs, lengths) if p + max(c, r) + 1 <= max_tokens]
    if len(fitting) < n:
        raise UserError(f"{path} has {len(fitting)} pairs that fit in {max_tokens} tokens, fewer than {n}")
    return fitting[:n]


def build(directory):
    """Write pairs.jsonl and the checkpoint under directory (each only if missing); returns their paths."""
    os.makedirs(directory, exist_ok=True)
    pairs_path = os.path.join(directory, "pairs.jsonl")
    if not os.path.isfile(pairs_path):
        write_text(pairs_path, "".join(json.dumps(pair) + "\n" for pair in hh_pairs()))
    checkpoint = os.path.join(directory, CHECKPOINT)
    if not os.path.isfile(os.path.join(checkpoint, "model.safetensors")):
        write_checkpoint(checkpoint)
    return checkpoint, pairs_path


def write_checkpoint(directory):
    import torch
    from tiktoken.load import read_file_cached
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging
    logging.disable_progress_bar()  # one small file: no progress bar in the comparison's output
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=1024, **SHAPE)).save_pretrained(directory)
    for name, (url, sha256) in TOKENIZER_FILES.items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(read_file_cached(url, sha256))  # from TIKTOKEN_CACHE_DIR when offline


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        sys.exit("usage: python -m benchmarks.workload DIRECTORY")
    with user_errors():
        print(*build(sys.argv[1]), sep="\n")
