"""python -m machinery.inspect_data: look at the data before training on it (the load summary, the first pair
as text, token lengths, and one example token by token with what each position is trained to predict), cut to
the token budget training would use."""
import os
import sys

import torch

from data import get_tokenizer, inputs_and_labels, load_preferences, tokenize_pairs
from machinery.cli import ArgumentParser, HelpFormatter, at_least, description, user_errors
from model import IGNORE_INDEX

# the --max_len sft.py and dpo.py train with: their --demo's on the toy task, their defaults elsewhere
# (tests/test_formats.py checks that these are still the scripts' values)
DEMO_MAX_LEN, MAX_LEN = 64, 512


def inspect(source, split, max_len, max_prompt_len, split_name=None):
    tokenizer = get_tokenizer()
    pairs = load_preferences(source, split, split_name=split_name)
    if source == "toy":
        print(f"data: toy [{split}]: {len(pairs)} pairs, made by data.toy_pairs")
    first = pairs[0]
    print("\nfirst pair as text, split where training splits it:")
    for field in ("prompt", "chosen", "rejected"):
        print(f"{field + ':':<10} {first[field]!r}")
    tokenized = tokenize_pairs(pairs, max_len, max_prompt_len, tokenizer)
    print("\ntoken lengths    p50    p90    p99    max")
    for field in ("prompt", "chosen", "rejected"):
        lengths = torch.tensor([len(t[field]) for t in tokenized], dtype=torch.float)
        p50, p90, p99 = (int(lengths.quantile(q).item()) for q in (0.5, 0.9, 0.99))
        print(f"{field:<14} {p50:6d} {p90:6d} {p99:6d} {int(lengths.max()):6d}")
    ids, labels = inputs_and_labels(tokenized[0]["prompt"], tokenized[0]["chosen"])
    print("\nfirst pair, prompt + chosen, token by token ('.' = not trained, else the label's text):")
    for position, (token, label) in enumerate(zip(ids, labels)):
        target = "." if label == IGNORE_INDEX else repr(tokenizer.decode([label]))
        print(f"{position:5d} {token:6d} {tokenizer.decode([token])!r:<20} -> {target}")


def main(argv=None):
    parser = ArgumentParser(prog="python -m machinery.inspect_data", description=description(__doc__),
                            formatter_class=HelpFormatter)
    parser.add_argument("--data", default="toy", help="a hub name (NAME or NAME:DIR), a directory of split "
                        "files, a .jsonl/.json/.parquet/.csv file, or toy")
    parser.add_argument("--split", default="train", choices=("train", "test"), help="which split to show")
    parser.add_argument("--split_name", help="that split's name in the source, e.g. train_prefs (default: the "
                        "value of --split)")
    parser.add_argument("--max_len", type=at_least(2), help="tokens of prompt + response, at most (default: as "
                        f"sft.py and dpo.py train: {DEMO_MAX_LEN} for toy, their --demo's; {MAX_LEN} for the rest)")
    parser.add_argument("--max_prompt_len", type=at_least(1), help="tokens a too-long prompt is cut to, its end "
                        "kept (default: max_len / 2, as in training)")
    args = parser.parse_args(argv)
    args.max_len = args.max_len or (DEMO_MAX_LEN if args.data == "toy" else MAX_LEN)
    args.max_prompt_len = args.max_prompt_len or args.max_len // 2
    print(f"token budget: --max_len {args.max_len}, --max_prompt_len {args.max_prompt_len}")
    if args.max_prompt_len >= args.max_len:
        parser.error(f"--max_prompt_len {args.max_prompt_len} must be below --max_len {args.max_len}")
    try:
        with user_errors():
            inspect(args.data, args.split, args.max_len, args.max_prompt_len, args.split_name)
        sys.stdout.flush()  # here, not at exit: a reader that stopped early is caught below
    except BrokenPipeError:
        # the reader stopped (`| head`): stop quietly, as Unix tools do; stdout goes to devnull so that
        # Python's own flush at exit does not fail on the closed pipe a second time
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


if __name__ == "__main__":
    main()
