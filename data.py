"""Preference data: where pairs come from, how they become tokens, and which tokens are trained on.

Most DPO bugs are data bugs (a wrong prompt/response boundary, an EOS never trained, padding counted as
response, truncation cutting the wrong end), so every step here is explicit and tested:

    source -> load_preferences -> [{"prompt", "chosen", "rejected"}] (text)
           -> tokenize_pairs   -> prompt / chosen / rejected token ids, EOS appended, truncated to fit
           -> sft_examples + collate / dpo_batch / packed_dpo_batch
                               -> input_ids and labels (IGNORE_INDEX on prompt and padding)

Sources: `toy` (a synthetic task with a known reward, no download); a hub dataset by name (`NAME`, or
one of its data directories as `NAME:DIR`, e.g. `Anthropic/hh-rlhf:helpful-base`); one local file
(.jsonl, .json, .parquet, .csv, or .gz of the text ones); or a directory of split files, named by
split (`train.jsonl`, `test.parquet`, ...) or in the hub's layout (`data/train-00000-of-00001.parquet`).
sources.py finds and reads them. A source with a single split (one file, one split file, a hub dataset
with one split) holds out every 20th record as the test split.

Formats, detected from the fields of each record (one format per source):

    prompt/chosen/rejected text   {"prompt": "...", "chosen": "...", "rejected": "..."}, taken as they are
    HH dialogues                  {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}: split after
                                  the last "\\n\\nAssistant:" (Anthropic's HH-RLHF)
    shared-start text             {"chosen": "...", "rejected": "..."} without HH markers: the prompt is the
                                  longest run of whole words both texts start with
    conversational                {"chosen": [{"role": "user", "content": ...}, ...], "rejected": [...]}, with
                                  an optional "prompt" (messages, or text as one user message): rendered as
                                  HH text (render_hh), the last assistant message being the response
    Stanford SHP                  {"history", "human_ref_A", "human_ref_B", "labels", "score_A", "score_B"}:
                                  the labelled-preferred reply is chosen; pairs whose scores differ by less
                                  than a factor of 2 are dropped, as in the DPO authors' reference
                                  implementation (Rafailov, Sharma, Mitchell et al.,
                                  github.com/eric-mitchell/direct-preference-optimization)

    python data.py --inspect --data toy
"""
import collections
import os
import random
import re
import sys

import torch

from model import IGNORE_INDEX
from runs import ArgumentParser, HelpFormatter, UserError, user_errors
from sources import HELD_OUT_EVERY, read_records

EOS = 50256           # <|endoftext|>: appended to every response and trained on, so the model learns to stop
HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
SHP_FIELDS = ("history", "human_ref_A", "human_ref_B", "labels")
SHP_MIN_SCORE_RATIO = 2


def get_tokenizer():
    """GPT-2's BPE through tiktoken (offline: point TIKTOKEN_CACHE_DIR at a copy of its files)."""
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken downloads the vocabulary on first use
        raise UserError(f"could not load GPT-2's tokenizer ({type(e).__name__}); with no network, set "
                        "TIKTOKEN_CACHE_DIR to a folder holding its files (see README)") from None


# ----------------------------------------------------------------------------------------------------
# Sources -> records (one dict per line, item or row) -> list of {"prompt", "chosen", "rejected"}

def load_preferences(source, split="train", verbose=True, *, split_name=None):
    """Preference pairs of one split as text; prints one line: pairs kept, dropped for which reason, format.

    split is the role, "train" or "test"; split_name is that split's name in the source when it differs
    (e.g. "train_prefs" of a hub dataset, or of a directory holding train_prefs.jsonl)."""
    if split not in ("train", "test"):
        raise UserError(f"split {split!r}: the splits are train and test (name the source's own with split_name)")
    split_name = split_name or split
    if source == "toy":
        if split_name != split:
            raise UserError(f"toy has no split {split_name!r}: its splits are train and test")
        pairs, dropped, format_name, held_out = toy_pairs(split), collections.Counter(), "toy", False
    else:
        numbered, held_out = read_records(source, split_name)
        records, locations = [record for _, record in numbered], [where for where, _ in numbered]
        format_name, outcomes = records_to_pairs(records, locations)
        if held_out:
            outcomes = _hold_out(outcomes, split, source)
        pairs = [outcome for outcome in outcomes if isinstance(outcome, dict)]
        dropped = collections.Counter(outcome for outcome in outcomes if isinstance(outcome, str))
    if verbose:
        reasons = ", ".join(f"{n} {why}" for why, n in dropped.items()) or "none"
        hold_out = f"; every {HELD_OUT_EVERY}th record held out for test" if held_out else ""
        print(f"data: {source} [{split_name}]: kept {len(pairs)} pairs, dropped {sum(dropped.values())} "
              f"({reasons}); format: {format_name}{hold_out}")
    if not pairs:
        raise UserError(f"{source} [{split_name}] has no usable preference pairs")
    return pairs


def _hold_out(outcomes, split, source):
    """One split, two roles: every HELD_OUT_EVERY-th record is test, the rest train."""
    if len(outcomes) < HELD_OUT_EVERY:
        raise UserError(f"{source}: {len(outcomes)} pairs: need at least {HELD_OUT_EVERY} to hold out every "
                        f"{HELD_OUT_EVERY}th as the test split; add pairs, or give train and test split files")
    keep_test = split == "test"
    return [o for i, o in enumerate(outcomes) if (i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1) == keep_test]


# ----------------------------------------------------------------------------------------------------
# Records -> pairs: the format of each record, and where its prompt ends

def records_to_pairs(records, locations=None):
    """Records of one source -> (format name, outcomes): outcome i is record i's {"prompt", "chosen",
    "rejected"} or, a string, the reason it was dropped. locations[i] names record i in errors (file and
    line, item or row); by default "record i".

    Every record must be in the first record's format (a mixture is a UserError naming the first record
    that differs). Whatever the format, a pair is dropped when a response is empty or blank, or when the
    two responses are identical (nothing to prefer)."""
    locations = locations or [f"record {number}" for number in range(1, len(records) + 1)]
    records = list(zip(locations, records))
    first_format, first_where = None, None
    for where, record in records:
        format_name = _record_format(record, where)
        if first_format is None:
            first_format, first_where = format_name, where
        elif format_name != first_format:
            raise UserError(f"{where}: a record in the {format_name} format, but {first_where} is in the "
                            f"{first_format} format; one source holds one format")
    split_record = {"prompt/chosen/rejected text": _split_explicit, "conversational": _split_messages,
                    "Stanford SHP": _split_shp}.get(first_format)
    if first_format == "chosen/rejected text":  # HH when any dialogue has HH's turn markers
        is_hh = any(ASSISTANT in record["chosen"] for _, record in records)
        first_format = "HH dialogues" if is_hh else "shared-start text"
        split_record = _split_hh if is_hh else _split_shared_start
    outcomes = []
    for where, record in records:
        outcome = split_record(record, where)
        if isinstance(outcome, tuple):
            outcome = _usable_pair(*outcome)
        outcomes.append(outcome)
    return first_format, outcomes


KNOWN_FORMATS = ("prompt/chosen/rejected text; chosen/rejected text (HH dialogues, or a shared start); chosen/"
                 "rejected lists of role/content messages (prompt optional); Stanford SHP (history, "
                 "human_ref_A, human_ref_B, labels)")


def _record_format(record, where):
    """The format of one record, from its fields; a record in none is a UserError naming what it holds."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected an object with chosen and rejected, found {_type_name(record)}")
    if "chosen" in record or "rejected" in record:
        for field in ("chosen", "rejected"):
            if field not in record:
                raise UserError(f"{where}: missing field '{field}'")
        chosen, rejected, prompt = record["chosen"], record["rejected"], record.get("prompt", "")
        if isinstance(chosen, str) and isinstance(rejected, str):
            if not isinstance(prompt, str):
                raise UserError(f"{where}: field 'prompt' is {_type_name(prompt)}, expected text like chosen "
                                "and rejected")
            return "prompt/chosen/rejected text" if "prompt" in record else "chosen/rejected text"
        if isinstance(chosen, list) and isinstance(rejected, list):
            if not isinstance(prompt, (str, list)):
                raise UserError(f"{where}: field 'prompt' is {_type_name(prompt)}, expected a list of "
                                "messages or text")
            return "conversational"
        raise UserError(f"{where}: field 'chosen' is {_type_name(chosen)} and 'rejected' is "
                        f"{_type_name(rejected)}; both must be text, or both lists of messages")
    if any(field in record for field in SHP_FIELDS):
        for field in SHP_FIELDS:
            if field not in record:
                raise UserError(f"{where}: missing field '{field}' of the Stanford SHP format")
        return "Stanford SHP"
    raise UserError(f"{where}: fields {', '.join(map(str, record)) or '(none)'} match no known format; "
                    f"known: {KNOWN_FORMATS}")


def _type_name(value):
    return "null" if value is None else type(value).__name__


def _usable_pair(prompt, chosen, rejected):
    if not chosen.strip() or not rejected.strip():
        return "empty response"
    if chosen == rejected:
        return "identical responses"  # nothing to prefer: DPO loss ln 2 and no gradient, whatever the model
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _split_explicit(record, where):
    return record["prompt"], record["chosen"], record["rejected"]


def _split_hh(record, where):
    """An HH dialogue is split after its last "\\n\\nAssistant:": the prompt is the conversation up to and
    including that marker, the response the rest, so prompt + response is the original text."""
    chosen, rejected = record["chosen"], record["rejected"]
    chosen_cut, rejected_cut = chosen.rfind(ASSISTANT), rejected.rfind(ASSISTANT)
    if chosen_cut < 0 or rejected_cut < 0:
        return "no assistant turn"
    prompt = chosen[:chosen_cut + len(ASSISTANT)]
    if rejected[:rejected_cut + len(ASSISTANT)] != prompt:
        return "prompt mismatch"  # the two replies answer different conversations
    return prompt, chosen[len(prompt):], rejected[len(prompt):]


def _split_shared_start(record, where):
    """Text without HH markers: the prompt is the longest run of whole words both texts start with. The
    cut goes back from the first differing character to the end of a word, so no word is split and each
    response starts with the whitespace before its first word (GPT-2's tokens carry it: " yes")."""
    chosen, rejected = record["chosen"], record["rejected"]
    cut = len(os.path.commonprefix([chosen, rejected]))
    while cut > 0 and not (_word_ends_at(chosen, cut) and _word_ends_at(rejected, cut)):
        cut -= 1
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _word_ends_at(text, position):
    return not text[position - 1].isspace() and (position == len(text) or text[position].isspace())


def _split_messages(record, where):
    """Conversational: the prompt's messages (if any) then each response's messages make one conversation
    per response; the last message must be the assistant's and is the response, and everything before it
    must be the same in both. Rendered as HH text (see render_hh)."""
    for field in ("prompt", "chosen", "rejected"):
        messages = record.get(field)
        if not isinstance(messages, list):
            continue  # no prompt, or a prompt as text
        for number, message in enumerate(messages, start=1):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                raise UserError(f"{where}: {field} message {number} is not a {{\"role\": ..., \"content\": "
                                f"text}} object (found {str(message)[:60]!r})")
    prompt, chosen, rejected = record.get("prompt", []), record["chosen"], record["rejected"]
    if isinstance(prompt, str):
        # text is the opening user message, unless it is empty or the conversations already open with it
        # (UltraFeedback-binarized repeats its prompt as text beside complete conversations)
        already_opened = bool(chosen) and _turn(chosen[0]) == ("user", prompt)
        prompt = [] if already_opened or not prompt else [{"role": "user", "content": prompt}]
    chosen, rejected = prompt + chosen, prompt + rejected
    if not chosen or not rejected or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        return "no assistant turn"
    context = chosen[:-1]
    if [_turn(m) for m in context] != [_turn(m) for m in rejected[:-1]]:
        return "prompt mismatch"
    roles = [m["role"] for m in context]
    if any(role not in ("system", "user", "assistant") for role in roles):
        return "unknown role"
    if "system" in roles[1:]:
        return "system message not first"
    return render_hh(context), " " + chosen[-1]["content"], " " + rejected[-1]["content"]


def _turn(message):
    return message["role"], message["content"]


def render_hh(messages):
    """Messages before a response, as the HH text our SFT teaches (GPT-2 has no chat template):
    "\\n\\nHuman: " + content for a user message, "\\n\\nAssistant: " + content for an assistant's, then the
    "\\n\\nAssistant:" the response follows (with its own leading space). A system message, allowed first
    only, is plain text before the first turn: HH has no system role, and a turn marker would put its
    words in someone's mouth."""
    marker = {"user": HUMAN + " ", "assistant": ASSISTANT + " ", "system": ""}
    return "".join(marker[m["role"]] + m["content"] for m in messages) + ASSISTANT


def _split_shp(record, where):
    """Stanford SHP: `labels` 1 means A is preferred (the dataset card's convention). Rendered as one HH
    turn, as the authors' code does. With scores, a pair whose higher score is less than
    SHP_MIN_SCORE_RATIO times the lower is dropped (a weak preference); the authors' code does the same."""
    for field in ("history", "human_ref_A", "human_ref_B"):
        if not isinstance(record[field], str):
            raise UserError(f"{where}: field '{field}' is {_type_name(record[field])}, expected text")
    label = record["labels"]
    if isinstance(label, bool) or label not in (0, 1):
        raise UserError(f"{where}: field 'labels' is {label!r}; Stanford SHP uses 1 (A preferred) or 0 (B)")
    scores = [record.get("score_A"), record.get("score_B")]
    if all(isinstance(score, (int, float)) and not isinstance(score, bool) for score in scores):
        if max(scores) < SHP_MIN_SCORE_RATIO * min(scores):
            return f"score ratio below {SHP_MIN_SCORE_RATIO}"
    elif any(score is not None for score in scores):
        raise UserError(f"{where}: fields 'score_A' and 'score_B' must both be numbers (or both absent), found "
                        f"{_type_name(scores[0])} and {_type_name(scores[1])}")
    if label == 1:
        preferred, other = record["human_ref_A"], record["human_ref_B"]
    else:
        preferred, other = record["human_ref_B"], record["human_ref_A"]
    return f"{HUMAN} {record['history']}{ASSISTANT}", " " + preferred, " " + other


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

    Truncation, when prompt + longer response exceeds max_len:
    1) the prompt keeps its last max_prompt_len tokens (the end of a conversation is what the reply
       answers), as the authors' code does for HH (for other data it keeps the start);
    2) if the pair still does not fit, both responses keep their first max_len - len(prompt) tokens (and
       lose their EOS). The authors' code cuts them to max_len - max_prompt_len instead; the two agree
       when step 1 cut the prompt, but theirs also cuts responses after a short prompt that left room,
       while ours uses all of max_len.
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


def tokenized_splits(source, max_len, max_prompt_len, train_split="train", test_split="test"):
    """(train, test) pairs of a source as token ids: what sft.py and dpo.py train and evaluate on."""
    return [tokenize_pairs(load_preferences(source, role, split_name=name), max_len, max_prompt_len)
            for role, name in (("train", train_split), ("test", test_split))]


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
    """Each pair as ONE sequence that holds its prompt once: prompt, chosen, rejected. dpo_batch runs
    every prompt twice, and prompts are often longer than responses (see PERFORMANCE.md for HH), so this
    sends fewer tokens through the blocks.

    Returns input_ids, labels (2, B, W): the chosen plane then the rejected plane, positions and
    segments (B, W). Each response continues the prompt's positions, and GPT.forward lets a token see
    the prompt (segment 0) and its own response (1 chosen, 2 rejected), never the other response, so
    every log-prob equals dpo_batch's.

    The label shift is done here, not in example(): the rejected response sits after the chosen one but
    continues the prompt, so one shift of the whole sequence would be wrong at the joins, and each
    plane's labels are laid out by hand. labels[t] is still the token that follows input_ids[t] in that
    response's own prompt + response; the prompt's last token predicts the first token of both
    responses, so it carries a label in both planes."""
    packed = []
    for t in tokenized:
        prompt, chosen, rejected = t["prompt"], t["chosen"], t["rejected"]
        p, c, r = len(prompt), len(chosen), len(rejected)
        ids = prompt + chosen[:-1] + rejected[:-1]
        positions = list(range(p + c - 1)) + list(range(p, p + r - 1))
        segments = [0] * p + [1] * (c - 1) + [2] * (r - 1)
        chosen_labels = [IGNORE_INDEX] * (p - 1) + chosen + [IGNORE_INDEX] * (r - 1)
        rejected_labels = [IGNORE_INDEX] * (p - 1) + rejected[:1] + [IGNORE_INDEX] * (c - 1) + rejected[1:]
        packed.append((ids, chosen_labels, rejected_labels, positions, segments))
    width = max(len(ids) for ids, *_ in packed)
    input_ids = torch.full((len(packed), width), EOS, dtype=torch.long)
    labels = torch.full((2, len(packed), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(packed), width), dtype=torch.long)
    segments = torch.full((len(packed), width), 3, dtype=torch.long)  # padding: a segment of its own
    for b, (ids, chosen_labels, rejected_labels, pos, seg) in enumerate(packed):
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

def inspect(source, split, max_len, max_prompt_len, split_name=None):
    tokenizer = get_tokenizer()
    pairs = load_preferences(source, split, split_name=split_name)
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
    ids, labels = example(tokenized[0]["prompt"], tokenized[0]["chosen"])
    print("\nfirst pair, prompt + chosen, token by token ('.' = not trained, else the label's text):")
    for position, (token, label) in enumerate(zip(ids, labels)):
        target = "." if label == IGNORE_INDEX else repr(tokenizer.decode([label]))
        print(f"{position:5d} {token:6d} {tokenizer.decode([token])!r:<20} -> {target}")


def main(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--inspect", action="store_true",
                        help="print the load summary, the first pair as text, token lengths and one example")
    parser.add_argument("--data", default="toy", help="a hub name (NAME or NAME:DIR), a directory of split "
                        "files, a .jsonl/.json/.parquet/.csv file, or toy")
    parser.add_argument("--split", default="train", choices=("train", "test"), help="which split to show")
    parser.add_argument("--split_name", help="that split's name in the source, e.g. train_prefs (default: the "
                        "value of --split)")
    parser.add_argument("--max_len", type=int, default=512, help="tokens of prompt + response, at most")
    parser.add_argument("--max_prompt_len", type=int, help="tokens a too-long prompt is cut to, its end kept "
                        "(default: max_len / 2, as in training)")
    args = parser.parse_args(argv)
    args.max_prompt_len = args.max_prompt_len or args.max_len // 2
    if not args.inspect:
        parser.error("nothing to do: pass --inspect")
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
