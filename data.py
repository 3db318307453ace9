"""Preference data: pairs of replies to one prompt, the tokens they become, and which tokens are trained on.

Most DPO bugs are data bugs (a wrong prompt/response boundary, an EOS never trained, padding counted as response,
truncation cutting the wrong end), so every step is explicit and tested: load_preferences (text) -> tokenize_pairs
(token ids, EOS appended, truncated) -> sft_examples and collate, or dpo_batch (labels shifted by one, IGNORE_INDEX
on prompt and padding). `python -m machinery.inspect_data` shows a source token by token."""
import random
import re

import tiktoken
import torch

from machinery import UserError
from machinery.formats import Dialogue, read_pairs
from model import IGNORE_INDEX

EOS = 50256  # <|endoftext|>: appended to every response and trained on, so the model learns to stop
HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"


def get_tokenizer():
    """GPT-2's BPE (byte-pair encoding) through tiktoken, which downloads two files on first use."""
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise UserError(f"could not load GPT-2's tokenizer ({type(e).__name__}); with no network, set "
                        "TIKTOKEN_CACHE_DIR to a folder holding its files (see README)") from None


def load_preferences(source, split="train", verbose=True, split_name=None):
    """Preference pairs of one split ("train" or "test") as text; split_name: its name in the source if other."""
    if source == "toy" and split_name in (None, split):
        return toy_pairs(split)
    return read_pairs(source, split, HH, split_name, verbose)  # every other source and record format


def split_hh(chosen, rejected):
    """An HH-RLHF record is two whole dialogues that differ only in the last reply. The prompt is the
    conversation up to and including the last "\\n\\nAssistant:", the responses the rest, so prompt +
    response is the original text. Returns (prompt, chosen, rejected), or the reason the pair is unusable."""
    chosen_cut, rejected_cut = chosen.rfind(ASSISTANT), rejected.rfind(ASSISTANT)
    if chosen_cut < 0 or rejected_cut < 0:
        return "no assistant turn"
    prompt = chosen[:chosen_cut + len(ASSISTANT)]
    if rejected[:rejected_cut + len(ASSISTANT)] != prompt:
        return "prompt mismatch"  # the two replies answer different conversations
    return prompt, chosen[len(prompt):], rejected[len(prompt):]


HH = Dialogue(HUMAN, ASSISTANT, split_hh)  # what machinery/formats.py needs of HH to render other formats as HH


# The toy task: requests answered politely (chosen) or rudely (rejected), and an oracle that scores any reply

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
TOY_ANSWER = "To {task}, start small and practice daily."  # the middle sentence of every toy reply


def toy_pairs(split):
    """Deterministic pairs: the chosen reply is polite, the rejected one rude, the same answer between. Held out
    means never trained on: a test prompt's (task, name) is one no training prompt has (a quarter of the 24 x 12
    = 288 combinations; each task and name is still seen in training with others), so it asks new combinations."""
    rng = random.Random(0 if split == "train" else 1)
    requests = [(task, name, ask) for i, task in enumerate(TOY_TASKS) for j, name in enumerate(TOY_NAMES)
                for ask in TOY_ASKS if ((i + j) % 4 == 0) == (split == "test")]
    # training draws its 2,000 pairs from its 864 requests; the test split 200 different ones of its 72 x 4 = 288
    drawn = [rng.choice(requests) for _ in range(2000)] if split == "train" else rng.sample(requests, 200)
    pairs = []
    for task, name, ask in drawn:
        prompt = f"{HUMAN} Hi, I am {name}. {ask.format(t=task)}{ASSISTANT}"
        pairs.append({"prompt": prompt, "chosen": _toy_reply(rng, task, name, TOY_POLITE),
                      "rejected": _toy_reply(rng, task, name, TOY_RUDE)})
    return pairs


def _toy_reply(rng, task, name, words):
    opener, closer = words
    return f" {rng.choice(opener)}, {name}. {TOY_ANSWER.format(task=task)} {rng.choice(closer).capitalize()}!"


def toy_reward(prompt, reply):
    """The oracle. A reply counts only if it answers the request: it says the prompt's task's answer exactly
    once. Then its tone scores it: +1 if its tone words are all polite, -1 if all rude, the balance in
    between. A reply that does not answer (the answer dropped, cut short, repeated, or about another task)
    scores -1, as low as the rudest answer: polite words alone, or length, buy nothing."""
    task = next((task for task in TOY_TASKS if task in prompt), None)
    if task is None or reply.count(TOY_ANSWER.format(task=task)) != 1:
        return -1.0

    def count(tone):  # its words and phrases, whole words only: "no" must not match inside "know"
        return sum(len(re.findall(rf"\b{re.escape(w.lower())}\b", reply.lower())) for group in tone for w in group)
    polite, rude = count(TOY_POLITE), count(TOY_RUDE)
    return (polite - rude) / (polite + rude) if polite + rude else 0.0


# Text -> tokens, with truncation

def tokenize_pairs(pairs, max_len=512, max_prompt_len=256, tokenizer=None, verbose=True):
    """Token ids per pair: {"prompt", "chosen", "rejected"}; each response ends in EOS. Prompt and responses are
    encoded apart and joined, so the boundary is exact (encoding the joined text could merge a token across it).
    When prompt + longer response exceeds max_len: 1) the prompt keeps its last max_prompt_len tokens (the end
    of a conversation is what the reply answers), as the authors' code does for HH; 2) if it still does not fit,
    both responses keep their first max_len - len(prompt) tokens (losing their EOS). A pair whose two responses
    became identical is dropped: there is nothing left to prefer."""
    assert 0 < max_prompt_len < max_len, (max_prompt_len, max_len)
    tokenizer = tokenizer or get_tokenizer()
    encode = tokenizer.encode_ordinary_batch  # ordinary: "<|endoftext|>" inside text stays plain text
    prompts = encode([p["prompt"] for p in pairs])
    chosens = encode([p["chosen"] for p in pairs])
    rejecteds = encode([p["rejected"] for p in pairs])
    out, prompts_cut, responses_cut = [], 0, 0
    for prompt, chosen, rejected in zip(prompts, chosens, rejecteds):
        # an empty prompt starts from EOS (GPT-2 has no start token): the first response token needs a position
        # before it to be predicted from
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
    kept = [t for t in out if t["chosen"] != t["rejected"]]
    if verbose:
        print(f"tokens: max_len {max_len}, max_prompt_len {max_prompt_len}: {prompts_cut} of {len(out)} prompts "
              f"cut to their end, {responses_cut} pairs with responses cut to fit, {len(out) - len(kept)} pairs "
              "dropped whose responses became identical")
    if pairs and not kept:
        raise UserError(f"every pair's two responses are identical once cut to --max_len {max_len}: raise --max_len")
    return kept


def tokenized_splits(source, max_len, max_prompt_len, train_split="train", test_split="test"):
    """(train, test) pairs of a source as token ids: what sft.py and dpo.py train and evaluate on."""
    return [tokenize_pairs(load_preferences(source, role, split_name=name), max_len, max_prompt_len)
            for role, name in (("train", train_split), ("test", test_split))]


# Tokens -> batches

def inputs_and_labels(prompt, response):
    """(input_ids, labels) of one sequence, and the shift, in one place: labels[t] is the token that
    follows input_ids[t], so the model's output at position t is scored against labels[t]. Labels are
    IGNORE_INDEX where the next token is still prompt: only response tokens (and EOS) are trained."""
    tokens = prompt + response
    labels = [IGNORE_INDEX] * (len(prompt) - 1) + response
    return tokens[:-1], labels


def collate(sequences):
    """Pad (input_ids, labels) pairs to the longest in this batch, not to max_len."""
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), width), EOS, dtype=torch.long)  # the pad id is arbitrary: masked
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, labs) in enumerate(sequences):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(labs)] = torch.tensor(labs)
    return input_ids, labels


def sft_examples(tokenized, target="chosen"):
    """(input_ids, labels) of prompt + response for each pair; target "both" gives two per pair."""
    responses = ("chosen", "rejected") if target == "both" else (target,)
    return [inputs_and_labels(t["prompt"], t[response]) for t in tokenized for response in responses]


def dpo_batch(tokenized):
    """Chosen and rejected stacked into one batch of 2B rows (chosen rows first), for one forward pass."""
    return collate([inputs_and_labels(t["prompt"], t["chosen"]) for t in tokenized] +
                   [inputs_and_labels(t["prompt"], t["rejected"]) for t in tokenized])


def batch_indices(n, batch_size, step, seed):
    """Indices of micro-batch number `step`: a fresh shuffle each epoch, fixed by (seed, epoch). A pure
    function of the step, so a resumed run sees exactly the batches a straight run would."""
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise UserError(f"--batch_size {batch_size} is larger than the {n} training examples")
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return order[position * batch_size:(position + 1) * batch_size].tolist()

