"""On-policy preference pairs, as in the DPO paper's IMDb experiment (its sec. 6.1): two samples of a model per
toy training prompt, the oracle's preferred one as chosen (ties dropped), written as a pairs file dpo.py reads
with --data. experiments/frontier.py trains "DPO, on-policy pairs" on them.

    python -m experiments.onpolicy_pairs --init out/demo/sft --out out/demo/onpolicy-pairs.jsonl
"""
import json
import os

import torch

from data import get_tokenizer, load_preferences, toy_reward
from machinery import UserError
from machinery.cli import ArgumentParser, at_least, user_errors
from machinery.files import try_writing, write_text
from machinery.models import open_model
from sample import complete


@torch.no_grad()
def onpolicy_pairs(init, num_prompts=None, max_new_tokens=32, batch_size=200, seed=1337):
    """[{"prompt", "chosen", "rejected"}] of two samples of `init` per toy training prompt, and the ties dropped."""
    tokenizer = get_tokenizer()
    policy = open_model(init).eval()
    texts = [p["prompt"] for p in load_preferences("toy", "train")][:num_prompts]
    prompts = [tokenizer.encode_ordinary(t) for t in texts]
    pairs, ties = [], 0
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        samples = []
        for copy_number in range(2):
            generators = [torch.Generator().manual_seed(seed * 1000003 + 2 * (start + i) + copy_number)
                          for i in range(len(batch))]
            samples.append(complete(policy, batch, tokenizer, generators, max_new_tokens)[1])
        for text, a, b in zip(texts[start:start + batch_size], *samples):
            if toy_reward(text, a) == toy_reward(text, b):
                ties += 1  # the oracle prefers neither: no pair
                continue
            chosen, rejected = (a, b) if toy_reward(text, a) > toy_reward(text, b) else (b, a)
            pairs.append({"prompt": text, "chosen": chosen, "rejected": rejected})
    return pairs, ties


def check_writable(out, overwrite):
    """Before sampling: refuse a path that is a directory, an existing file (unless overwrite), or that cannot be
    written, in one line."""
    if os.path.isdir(out):
        raise UserError(f"--out {out} is a directory; give a file name, e.g. {os.path.join(out, 'pairs.jsonl')}")
    if os.path.exists(out) and not overwrite:
        raise UserError(f"--out {out} exists; pass --overwrite to replace it, or give another file")
    folder = os.path.dirname(out) or "."
    try:
        os.makedirs(folder, exist_ok=True)
        try_writing(out)
    except OSError as e:
        raise UserError(f"cannot write --out {out} ({e.strerror}); give a file in a folder you can write to") from None


def main(argv=None):
    p = ArgumentParser(prog="python -m experiments.onpolicy_pairs", description=__doc__.split("\n\n")[0])
    p.add_argument("--init", default="out/demo/sft", help="the model to sample (default: out/demo/sft)")
    p.add_argument("--out", default="out/demo/onpolicy-pairs.jsonl", help="the pairs file (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--max_new_tokens", type=at_least(1), default=32, help="tokens a sample, at most (default: 32)")
    p.add_argument("--batch_size", type=at_least(1), default=200, help="prompts sampled at once (default: 200)")
    p.add_argument("--num_prompts", type=at_least(1), help="the first N training prompts (default: all)")
    p.add_argument("--seed", type=int, default=1337, help="the samples' seed (default: 1337)")
    args = p.parse_args(argv)
    with user_errors():
        check_writable(args.out, args.overwrite)
        pairs, ties = onpolicy_pairs(args.init, args.num_prompts, args.max_new_tokens, args.batch_size, args.seed)
        if not pairs:
            raise UserError(f"every one of the {ties} prompts gave two samples the oracle ties: no pairs, nothing "
                            "written; sample more prompts, or a model whose replies differ")
        try:
            write_text(args.out, "".join(json.dumps(pair) + "\n" for pair in pairs))
        except OSError as e:
            raise UserError(f"cannot write --out {args.out} ({e.strerror}); {args.out} is as it was") from None
    print(f"wrote {args.out}: {len(pairs)} on-policy pairs of {len(pairs) + ties} prompts ({ties} ties dropped)")


if __name__ == "__main__":
    main()
