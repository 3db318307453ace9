"""Preference data: where pairs come from, how they become tokens, and which tokens are trained on.

Most DPO bugs are data bugs (a wrong prompt/response boundary, an EOS never trained, padding counted as
response, truncation cutting the wrong end), so every step here is explicit and tested:

    source -> load_preferences -> [{"prompt", "chosen", "rejected"}] (text)
           -> tokenize_pairs   -> prompt / chosen / rejected token ids, EOS appended, truncated to fit
           -> sft_batch / dpo_batch -> padded input_ids and labels (IGNORE_INDEX on prompt and padding)

Sources: a hub dataset (`Anthropic/hh-rlhf`, or one subset as `Anthropic/hh-rlhf:helpful-base`), a
local directory in the hub's layout (`train.jsonl.gz`, `test.jsonl.gz`), one .jsonl/.json file, or
`toy`, a synthetic task with a known reward that needs no download.

    python data.py --inspect --data toy
"""
import argparse
import gzip
import json
import os
import random
import re

import torch

from model import IGNORE_INDEX
from runs import UserError, user_errors

EOS = 50256           # <|endoftext|>: appended to every response and trained on, so the model learns to stop
ASSISTANT = "\n\nAssistant:"
HELD_OUT_EVERY = 20   # a source with one file only: every 20th pair is the test split (5%)


def get_tokenizer():
    """GPT-2's BPE through tiktoken (offline: point TIKTOKEN_CACHE_DIR at a copy of its files)."""
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken downloads the vocabulary on first use
        raise UserError(f"could not load GPT-2's tokenizer ({type(e).__name__}); with no network, set "
                        "TIKTOKEN_CACHE_DIR to a folder holding its files (see README)") from None


# ----------------------------------------------------------------------------------------------------
# Sources -> list of {"prompt", "chosen", "rejected"}

def load_preferences(source, split="train", verbose=True):
    """Preference pairs of one split as text; prints one line: kept, and dropped for which reason."""
    if source == "toy":
        pairs, dropped = toy_pairs(split), {}
    else:
        records = _read_records(source, split)
        pairs, dropped = split_dialogues(records)
    if verbose:
        reasons = ", ".join(f"{n} {why}" for why, n in dropped.items() if n) or "none"
        print(f"data: {source} [{split}]: kept {len(pairs)} pairs, dropped {sum(dropped.values())} ({reasons})")
    if not pairs:
        raise UserError(f"{source} [{split}] has no usable preference pairs")
    return pairs


def _read_records(source, split):
    """Raw records ({"chosen", "rejected"} and maybe "prompt") of one split, from the hub or disk."""
    if os.path.exists(source) and split not in ("train", "test"):
        raise UserError(f"split {split!r} of {source}: local data has only train and test")
    if os.path.isdir(source):
        present = {}  # split -> file, .jsonl.gz preferred
        for split_name in ("train", "test"):
            for ext in (".jsonl", ".jsonl.gz"):
                path = os.path.join(source, split_name + ext)
                if os.path.isfile(path):
                    present[split_name] = path
        if not present:
            raise UserError(f"{source} has no train.jsonl(.gz) or test.jsonl(.gz); give a directory in the "
                            "hub's layout, a .jsonl file, a hub name, or 'toy'")
        if split in present and len(present) == 2:
            return _read_file(present[split])
        only = next(iter(present.values()))  # one split file: hold out every 20th pair for test
        return _hold_out(_read_file(only), split)
    if os.path.isfile(source):
        return _hold_out(_read_file(source), split)
    if source.endswith((".json", ".jsonl", ".gz")) or source.startswith((".", "/")):
        raise UserError(f"data file {source} does not exist")
    return _load_hub(source, split)


def _hold_out(records, split):
    """One file, two splits: every HELD_OUT_EVERY-th record is test, the rest train."""
    keep_test = split != "train"
    return [r for i, r in enumerate(records) if (i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1) == keep_test]


def _load_hub(name, split):
    """A hub dataset; NAME:SUBSET picks one data directory (e.g. Anthropic/hh-rlhf:helpful-base)."""
    import datasets
    name, _, subset = name.partition(":")
    try:
        dataset = datasets.load_dataset(name, data_dir=subset or None, split=split)
    except Exception as e:
        raise UserError(f"could not load {name} [{split}] from the Hugging Face hub ({type(e).__name__}); "
                        "check the network, or give a local directory (e.g. ../shared/data/hh-rlhf/"
                        "harmless-base) or a .jsonl file") from None
    return [dict(row) for row in dataset]


def _read_file(path):
    """Records of a .jsonl (one JSON object a line), .json (a list of objects) or gzipped .jsonl file."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not text.strip():
        raise UserError(f"{path} is empty; it should hold preference pairs, one JSON object a line")
    if path.endswith(".json"):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(rows, list):
            raise UserError(f"{path}: expected a JSON list of objects, found {type(rows).__name__}")
        numbered = [(f"{path}: item {i}", row) for i, row in enumerate(rows, start=1)]  # not a line number
    else:
        numbered = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((f"{path}:{line_no}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{line_no}: not valid JSON ({e.msg}); each line must be one "
                                "object with chosen and rejected") from None
    for where, row in numbered:
        _check_record(row, where)
    return [row for _, row in numbered]


def _check_record(row, where):
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object with chosen and rejected, found {type(row).__name__}")
    for field in ("prompt", "chosen", "rejected") if "prompt" in row else ("chosen", "rejected"):
        if field not in row:
            raise UserError(f"{where}: missing field '{field}'")
        if not isinstance(row[field], str):
            raise UserError(f"{where}: field '{field}' is {type(row[field]).__name__}, expected a string")


def split_dialogues(records):
    """Records -> (pairs, dropped counts). A record with a "prompt" field is taken as it is; an HH
    dialogue is split after its last "\\n\\nAssistant:": the prompt is the conversation up to and
    including that marker, the response is the rest, so prompt + response is the original text."""
    pairs, dropped = [], {"prompt mismatch": 0, "empty response": 0, "no assistant turn": 0}
    for r in records:
        if "prompt" in r:
            prompt, chosen, rejected = r["prompt"], r["chosen"], r["rejected"]
        else:
            cut_c, cut_r = r["chosen"].rfind(ASSISTANT), r["rejected"].rfind(ASSISTANT)
            if cut_c < 0 or cut_r < 0:
                dropped["no assistant turn"] += 1
                continue
            prompt = r["chosen"][:cut_c + len(ASSISTANT)]
            if r["rejected"][:cut_r + len(ASSISTANT)] != prompt:
                dropped["prompt mismatch"] += 1  # the two replies answer different conversations
                continue
            chosen, rejected = r["chosen"][len(prompt):], r["rejected"][len(prompt):]
        if not chosen.strip() or not rejected.strip():
            dropped["empty response"] += 1
            continue
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs, dropped


# ----------------------------------------------------------------------------------------------------
# The toy task: polite against rude replies, with an oracle reward

TOY_TASKS = ["bake bread", "fix a bike", "plant tomatoes", "learn chess", "write a poem", "paint a wall",
             "cook rice", "tie a tie", "clean a window", "train a puppy", "save money", "sleep better",
             "read faster", "start running", "brew tea", "sew a button", "build a shelf", "wash a car",
             "learn guitar", "fold a shirt", "study math", "make soup", "grow herbs", "draw a cat"]
TOY_NAMES = ["Ana", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jo", "Kai", "Lena"]
TOY_ASKS = ["Can you help me {t}?", "How do I {t}?", "I want to {t}. Any tips?", "Please explain how to {t}."]
TOY_POLITE = (["Sure", "Of course", "Happy to help", "Gladly", "Great question"],
              ["good luck", "have a wonderful day", "you will do great", "enjoy it", "thanks for asking"])
TOY_RUDE = (["Ugh", "No", "Whatever", "Seriously", "Go away"],
            ["stop bothering me", "figure it out yourself", "what a dumb question", "leave me alone",
             "that is boring"])


def _toy_reply(rng, task, name, words):
    opener, closer = words
    return f" {rng.choice(opener)}, {name}. To {task}, start small and practice daily. {rng.choice(closer).capitalize()}!"


def toy_pairs(split, n=None):
    """Deterministic pairs: the chosen reply is polite, the rejected one rude, same middle sentence."""
    rng = random.Random(0 if split == "train" else 1)
    n = n or (2000 if split == "train" else 200)
    pairs = []
    for _ in range(n):
        task, name = rng.choice(TOY_TASKS), rng.choice(TOY_NAMES)
        prompt = f"\n\nHuman: Hi, I am {name}. {rng.choice(TOY_ASKS).format(t=task)}{ASSISTANT}"
        pairs.append({"prompt": prompt, "chosen": _toy_reply(rng, task, name, TOY_POLITE),
                      "rejected": _toy_reply(rng, task, name, TOY_RUDE)})
    return pairs


def toy_reward(text):
    """The oracle: +1 for a purely polite reply, -1 for a purely rude one, the balance in between."""
    text = text.lower()

    def count(phrase):  # whole words only: "no" must not match inside "know"
        return len(re.findall(r"\b" + re.escape(phrase.lower()) + r"\b", text))
    polite = sum(count(w) for group in TOY_POLITE for w in group)
    rude = sum(count(w) for group in TOY_RUDE for w in group)
    return (polite - rude) / (polite + rude) if polite + rude else 0.0


# ----------------------------------------------------------------------------------------------------
# Text -> tokens, with truncation

def tokenize_pairs(pairs, max_len=512, max_prompt_len=256, tokenizer=None, verbose=True):
    """Token ids per pair: {"prompt", "chosen", "rejected"}; each response ends in EOS.

    Prompt and responses are encoded separately and joined, so the boundary is exact (encoding the
    joined text could merge the prompt's last characters with the response's first into one token).
    Truncation, as in the DPO reference implementation: if prompt + longer response exceeds max_len,
    the prompt keeps its last max_prompt_len tokens (the end of a conversation is what the reply
    answers); if it still does not fit, both responses keep their first max_len - prompt tokens (and
    lose their EOS).
    """
    if not 0 < max_prompt_len < max_len:
        raise UserError(f"--max_prompt_len ({max_prompt_len}) must be positive and below --max_len ({max_len})")
    tokenizer = tokenizer or get_tokenizer()
    encode = tokenizer.encode_ordinary_batch  # ordinary: "<|endoftext|>" inside text stays plain text
    prompts = encode([p["prompt"] for p in pairs])
    chosens = encode([p["chosen"] for p in pairs])
    rejecteds = encode([p["rejected"] for p in pairs])
    out, prompts_cut, responses_cut = [], 0, 0
    for prompt, chosen, rejected in zip(prompts, chosens, rejecteds):
        # an empty prompt starts from EOS (GPT-2 has no BOS): the first response token needs a position
        # before it to be predicted from, and example() needs one prompt token for its shift
        prompt = prompt or [EOS]
        chosen, rejected = chosen + [EOS], rejected + [EOS]
        if len(prompt) + max(len(chosen), len(rejected)) > max_len and len(prompt) > max_prompt_len:
            prompt = prompt[-max_prompt_len:]
            prompts_cut += 1
        room = max_len - len(prompt)
        if max(len(chosen), len(rejected)) > room:
            chosen, rejected = chosen[:room], rejected[:room]
            responses_cut += 1
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    if verbose:
        print(f"tokens: max_len {max_len}, max_prompt_len {max_prompt_len}: {prompts_cut} of {len(out)} "
              f"prompts cut to their end, {responses_cut} pairs with responses cut to fit")
    return out


# ----------------------------------------------------------------------------------------------------
# Tokens -> batches

def example(prompt, response):
    """(input_ids, labels) of one sequence. The shift lives here, once: labels[t] is the token that
    follows input_ids[t], so the model's output at position t is scored against labels[t]. Labels are
    IGNORE_INDEX where the next token is still prompt: only response tokens (and EOS) are trained."""
    tokens = prompt + response
    labels = [IGNORE_INDEX] * (len(prompt) - 1) + response
    return tokens[:-1], labels


def collate(sequences):
    """Pad (input_ids, labels) pairs to the longest in this batch, not to max_len."""
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), width), EOS, dtype=torch.long)  # pad id is arbitrary: masked
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, labs) in enumerate(sequences):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(labs)] = torch.tensor(labs)
    return input_ids, labels


def sft_examples(tokenized, target="chosen"):
    """(input_ids, labels) of prompt + response for each pair; target "both" gives two per pair."""
    responses = ("chosen", "rejected") if target == "both" else (target,)
    return [example(t["prompt"], t[response]) for t in tokenized for response in responses]


def dpo_batch(tokenized):
    """Chosen and rejected stacked into one batch of 2B (chosen rows first), for one forward pass."""
    return collate([example(t["prompt"], t["chosen"]) for t in tokenized] +
                   [example(t["prompt"], t["rejected"]) for t in tokenized])


def packed_dpo_batch(tokenized):
    """Each pair as ONE row that holds its prompt once: prompt, chosen, rejected. dpo_batch runs every
    prompt twice, and prompts are often longer than responses (on HH pairs under 256 tokens, 76 tokens
    against 34 and 41), so this sends far fewer tokens through the blocks.

    Returns input_ids, labels (2, B, W): the chosen plane then the rejected plane, positions and
    segments (B, W). Each response continues the prompt's positions, and GPT.forward lets a token see
    the prompt (segment 0) and its own response (1 chosen, 2 rejected), never the other response, so
    every log-prob equals dpo_batch's. The prompt's last token predicts the first token of both
    responses: it carries a label in both planes."""
    rows = []
    for t in tokenized:
        prompt, chosen, rejected = t["prompt"], t["chosen"], t["rejected"]
        p, c, r = len(prompt), len(chosen), len(rejected)
        ids = prompt + chosen[:-1] + rejected[:-1]
        positions = list(range(p + c - 1)) + list(range(p, p + r - 1))
        segments = [0] * p + [1] * (c - 1) + [2] * (r - 1)
        chosen_labels = [IGNORE_INDEX] * (p - 1) + chosen + [IGNORE_INDEX] * (r - 1)
        rejected_labels = [IGNORE_INDEX] * (p - 1) + rejected[:1] + [IGNORE_INDEX] * (c - 1) + rejected[1:]
        rows.append((ids, chosen_labels, rejected_labels, positions, segments))
    width = max(len(row[0]) for row in rows)
    input_ids = torch.full((len(rows), width), EOS, dtype=torch.long)
    labels = torch.full((2, len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.full((len(rows), width), 3, dtype=torch.long)  # padding: a segment of its own
    for b, (ids, chosen_labels, rejected_labels, pos, seg) in enumerate(rows):
        input_ids[b, :len(ids)] = torch.tensor(ids)
        labels[0, b, :len(ids)] = torch.tensor(chosen_labels)
        labels[1, b, :len(ids)] = torch.tensor(rejected_labels)
        positions[b, :len(ids)] = torch.tensor(pos)
        segments[b, :len(ids)] = torch.tensor(seg)
    return input_ids, labels, positions, segments


def batch_indices(n, batch_size, step, seed):
    """Indices of micro-batch number `step`: a fresh shuffle each epoch, fixed by (seed, epoch).

    A pure function of the step, so a resumed run sees exactly the batches a straight run would."""
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise UserError(f"--batch_size {batch_size} is larger than the {n} training examples")
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return order[position * batch_size:(position + 1) * batch_size].tolist()


# ----------------------------------------------------------------------------------------------------
# python data.py --inspect: look at the data before training on it

def inspect(source, split, max_len, max_prompt_len):
    tokenizer = get_tokenizer()
    tokenized = tokenize_pairs(load_preferences(source, split), max_len, max_prompt_len, tokenizer)
    print("token lengths    p50    p90    p99    max")
    for field in ("prompt", "chosen", "rejected"):
        lengths = torch.tensor([len(t[field]) for t in tokenized], dtype=torch.float)
        p50, p90, p99 = (int(lengths.quantile(q).item()) for q in (0.5, 0.9, 0.99))
        print(f"{field:<14} {p50:6d} {p90:6d} {p99:6d} {int(lengths.max()):6d}")
    first = tokenized[0]
    ids, labels = example(first["prompt"], first["chosen"])
    print("\nfirst pair, prompt + chosen, token by token ('.' = not trained, else the label's text):")
    for position, (token, label) in enumerate(zip(ids, labels)):
        target = "." if label == IGNORE_INDEX else repr(tokenizer.decode([label]))
        print(f"{position:5d} {token:6d} {tokenizer.decode([token])!r:<20} -> {target}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inspect", action="store_true", help="print the summary, lengths and one example")
    parser.add_argument("--data", default="toy", help="hub name, local directory, .jsonl/.json file, or toy")
    parser.add_argument("--split", default="train")
    parser.add_argument("--max_len", type=int, default=512)
    parser.add_argument("--max_prompt_len", type=int, help="default: max_len / 2, as in training")
    args = parser.parse_args(argv)
    args.max_prompt_len = args.max_prompt_len or args.max_len // 2
    if not args.inspect:
        parser.error("nothing to do: pass --inspect")
    with user_errors():
        inspect(args.data, args.split, args.max_len, args.max_prompt_len)


if __name__ == "__main__":
    main()
