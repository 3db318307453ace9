"""data.py: the HH boundary, tokenization and truncation, EOS, masks and the shift, batches, the toy task.

Most DPO bugs are data bugs, so these tests check exact numbers on real HH-RLHF pairs (the excerpt in
examples/) and exact tensors on hand-made pairs, rather than only that something ran. Every other record
format and file type is machinery/formats.py's, tested in test_formats.py.
"""
import collections
import gzip
import json
import os

import pytest
import torch

import data
from conftest import HH_TEST
from machinery import UserError
from model import IGNORE_INDEX

HH_DIR = os.path.dirname(HH_TEST)
EOS_TEXT = "<|endoftext|>"


@pytest.fixture(scope="module")
def tokenizer():
    return data.get_tokenizer()


@pytest.fixture(scope="module")
def hh_records():
    with gzip.open(HH_TEST, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def hh_outcomes(records):
    """data.split_hh on each record, then the pair rules every source shares (machinery/formats.py)."""
    from machinery.formats import records_to_pairs
    return records_to_pairs(records, data.HH)[1]


@pytest.fixture(scope="module")
def hh_pairs(hh_records):
    return [outcome for outcome in hh_outcomes(hh_records) if isinstance(outcome, dict)]


@pytest.fixture(scope="module")
def hh_full(hh_pairs, tokenizer):
    """HH pairs tokenized with room for everything: the longest prompt + response + EOS is 938 tokens,
    so with max_len 1100 neither branch of the truncation can fire."""
    return data.tokenize_pairs(hh_pairs, max_len=1100, max_prompt_len=1000, tokenizer=tokenizer, verbose=False)


def as_tuples(pairs):
    return [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs]


# ----------------------------------------------------------------------------------------------------
# Real HH-RLHF pairs: the split, the round trip, and the trained tokens

def test_hh_split_counts(hh_records):
    # the numbers of the excerpt's README: 512 records, one with an empty chosen reply (line 87)
    outcomes = hh_outcomes(hh_records)
    assert len(hh_records) == len(outcomes) == 512
    assert collections.Counter(o for o in outcomes if isinstance(o, str)) == {"empty response": 1}
    assert outcomes[86] == "empty response" and hh_records[86]["chosen"].endswith(data.ASSISTANT + " ")
    assert sum(isinstance(o, dict) for o in outcomes) == 511


def test_hh_prompt_plus_response_is_the_dialogue(hh_records, hh_pairs):
    # kept pairs come out in file order, so walk the records once and find each pair's own record
    records = iter(hh_records)
    for pair in hh_pairs:
        record = next((r for r in records if r["chosen"] == pair["prompt"] + pair["chosen"]), None)
        assert record is not None, "a kept pair does not reproduce any remaining record"
        assert pair["prompt"] + pair["rejected"] == record["rejected"]
        # split after the LAST assistant marker: the prompt ends with it, neither reply contains it
        assert pair["prompt"].endswith(data.ASSISTANT)
        assert data.ASSISTANT not in pair["chosen"] and data.ASSISTANT not in pair["rejected"]
        assert pair["chosen"].strip() and pair["rejected"].strip()


def test_hh_labels_decode_to_response_and_eos(hh_pairs, hh_full, tokenizer):
    assert len(hh_full) == len(hh_pairs)
    for pair, tokens in zip(hh_pairs, hh_full):
        assert tokenizer.decode(tokens["prompt"]) == pair["prompt"]  # nothing was cut
        for field in ("chosen", "rejected"):
            input_ids, labels = data.inputs_and_labels(tokens["prompt"], tokens[field])
            assert len(input_ids) == len(labels) == len(tokens["prompt"]) + len(tokens[field]) - 1
            # the prompt is never trained: -100 until the position whose next token is the response's first
            n_masked = len(tokens["prompt"]) - 1
            assert labels[:n_masked] == [IGNORE_INDEX] * n_masked
            trained = [label for label in labels if label != IGNORE_INDEX]
            assert tokenizer.decode(trained) == pair[field] + EOS_TEXT


def test_hh_directory_holds_out_every_20th_pair(hh_records, hh_pairs, capsys):
    # the directory holds only test.jsonl.gz (and a README), so load_preferences splits that one file itself
    train = data.load_preferences(HH_DIR, "train")
    test = data.load_preferences(HH_DIR, "test")
    lines = capsys.readouterr().out.splitlines()
    # one summary line per call; the one dropped record (position 86) falls outside the held-out 19, 39, ...
    note = f"format: HH dialogues; the only split of {HH_DIR} is 'test': every 20th record held out for test"
    assert lines == [f"data: {HH_DIR} [train]: kept 486 pairs, dropped 1 (1 empty response); {note}",
                     f"data: {HH_DIR} [test]: kept 25 pairs, dropped 0 (none); {note}"]
    held_out = [o for o in hh_outcomes(hh_records[19::20]) if isinstance(o, dict)]
    assert as_tuples(test) == as_tuples(held_out)
    # disjoint, and together exactly the kept pairs (the file has no duplicate pairs, so sets suffice)
    assert not set(as_tuples(train)) & set(as_tuples(test))
    assert collections.Counter(as_tuples(train) + as_tuples(test)) == collections.Counter(as_tuples(hh_pairs))


def test_hh_truncation_invariants(hh_pairs, hh_full, tokenizer, capsys):
    max_len, max_prompt_len = 128, 64
    cut = data.tokenize_pairs(hh_pairs, max_len, max_prompt_len, tokenizer)
    printed = capsys.readouterr().out.splitlines()
    prompts_cut = responses_cut = 0
    for full, short in zip(hh_full, cut):
        assert len(short["prompt"]) + max(len(short["chosen"]), len(short["rejected"])) <= max_len
        needed = len(full["prompt"]) + max(len(full["chosen"]), len(full["rejected"])) > max_len
        if short["prompt"] != full["prompt"]:
            # a prompt is cut only when the pair does not fit, and keeps its END (what the reply answers)
            prompts_cut += 1
            assert needed and short["prompt"] == full["prompt"][-max_prompt_len:]
        else:
            assert not (needed and len(full["prompt"]) > max_prompt_len)
        room = max_len - len(short["prompt"])
        any_response_cut = False
        for field in ("chosen", "rejected"):
            # a response keeps its START; it is cut exactly when it does not fit the room the prompt left
            assert short[field] == full[field][:room]
            if len(full[field]) > room:
                any_response_cut = True
                assert len(short[field]) == room and short[field] != full[field]
            else:
                assert short[field][-1] == data.EOS
        responses_cut += any_response_cut
    assert prompts_cut > 0 and responses_cut > 0  # both branches were exercised
    assert printed == [f"tokens: max_len {max_len}, max_prompt_len {max_prompt_len}: {prompts_cut} of "
                       f"{len(cut)} prompts cut to their end, {responses_cut} pairs with responses cut to fit, 0 pairs "
                       "dropped whose responses became identical"]


def test_pairs_identical_after_truncation_are_dropped_and_counted(tokenizer, capsys):
    # a long shared start: cut to 12 tokens, both replies are the same tokens, and DPO would train on nothing
    start = " word" * 20
    pairs = [{"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": start + " yes", "rejected": start + " no"},
             {"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " yes", "rejected": " no"}]
    kept = data.tokenize_pairs(pairs, max_len=12, max_prompt_len=6, tokenizer=tokenizer)
    assert len(kept) == 1 and kept[0]["chosen"] != kept[0]["rejected"]
    assert "1 pairs dropped whose responses became identical" in capsys.readouterr().out
    with pytest.raises(UserError, match="every pair's two responses are identical once cut to --max_len 12"):
        data.tokenize_pairs(pairs[:1], max_len=12, max_prompt_len=6, tokenizer=tokenizer, verbose=False)


def test_empty_prompt_starts_from_eos(tokenizer):
    # without a first prompt token the shift in inputs_and_labels() would be off by one and the labels one too long
    tokens = data.tokenize_pairs([{"prompt": "", "chosen": " yes", "rejected": " no no"}],
                                 tokenizer=tokenizer, verbose=False)[0]
    assert tokens["prompt"] == [data.EOS]
    yes, no = tokenizer.encode(" yes"), tokenizer.encode(" no")
    input_ids, labels = data.dpo_batch([tokens])
    # row 0: EOS, " yes", then one padding position (the rejected row is longer)
    assert input_ids.tolist() == [[data.EOS] + yes + [data.EOS], [data.EOS] + no + no]
    assert labels.tolist() == [yes + [data.EOS, IGNORE_INDEX], no + no + [data.EOS]]


# ----------------------------------------------------------------------------------------------------
# Batches

def test_dpo_batch_exact_tensors():
    tokenized = [{"prompt": [1, 2, 3], "chosen": [4, 5, data.EOS], "rejected": [6, data.EOS]},
                 {"prompt": [7], "chosen": [8, 9, 10, 11, data.EOS], "rejected": [12, data.EOS]}]
    input_ids, labels = data.dpo_batch(tokenized)
    P, E, I = data.EOS, data.EOS, IGNORE_INDEX  # padding id, end of text, ignored label
    # rows: chosen of pair 0, chosen of pair 1, then rejected of pair 0, rejected of pair 1;
    # width 5 = the longest sequence (7 + 5 response tokens, minus the shift), not max_len
    assert input_ids.dtype == labels.dtype == torch.long
    assert input_ids.tolist() == [[1, 2, 3, 4, 5],
                                  [7, 8, 9, 10, 11],
                                  [1, 2, 3, 6, P],
                                  [7, 12, P, P, P]]
    assert labels.tolist() == [[I, I, 4, 5, E],
                               [8, 9, 10, 11, E],
                               [I, I, 6, E, I],
                               [12, E, I, I, I]]


def test_dpo_batch_on_real_pairs(hh_pairs, tokenizer):
    tokenized = data.tokenize_pairs(hh_pairs[:8], 256, 128, tokenizer, verbose=False)
    input_ids, labels = data.dpo_batch(tokenized)
    B = len(tokenized)
    rows = [(t["prompt"], t["chosen"]) for t in tokenized] + [(t["prompt"], t["rejected"]) for t in tokenized]
    assert input_ids.shape == labels.shape == (2 * B, max(len(p) + len(r) - 1 for p, r in rows))
    for row, (prompt, response) in enumerate(rows):
        sequence, n = prompt + response, len(prompt) + len(response) - 1
        assert input_ids[row, :n].tolist() == sequence[:-1]
        assert labels[row, :len(prompt) - 1].eq(IGNORE_INDEX).all()  # prompt
        assert labels[row, len(prompt) - 1:n].tolist() == response    # response, EOS included
        assert labels[row, n:].eq(IGNORE_INDEX).all()                  # padding
        # the shift: where a label exists inside the sequence, it is the next input token
        for t in range(n - 1):
            if labels[row, t] != IGNORE_INDEX:
                assert labels[row, t] == input_ids[row, t + 1]


def test_sft_examples_targets():
    tokenized = [{"prompt": [1, 2], "chosen": [3, data.EOS], "rejected": [4, 5, data.EOS]},
                 {"prompt": [6], "chosen": [7, data.EOS], "rejected": [8, data.EOS]}]
    chosen = [data.inputs_and_labels(t["prompt"], t["chosen"]) for t in tokenized]
    rejected = [data.inputs_and_labels(t["prompt"], t["rejected"]) for t in tokenized]
    assert data.sft_examples(tokenized) == chosen  # chosen is the default
    assert data.sft_examples(tokenized, "chosen") == chosen
    assert data.sft_examples(tokenized, "rejected") == rejected
    assert data.sft_examples(tokenized, "both") == [chosen[0], rejected[0], chosen[1], rejected[1]]
    assert chosen[0] == ([1, 2, 3], [IGNORE_INDEX, 3, data.EOS])


def test_batch_indices():
    n, batch_size, seed = 12, 3, 7
    per_epoch = n // batch_size
    steps = [data.batch_indices(n, batch_size, step, seed) for step in range(3 * per_epoch)]
    # a pure function of (step, seed): a resumed run sees the same batches
    assert steps == [data.batch_indices(n, batch_size, step, seed) for step in range(3 * per_epoch)]
    assert all(len(batch) == batch_size for batch in steps)
    epochs = [sum(steps[e * per_epoch:(e + 1) * per_epoch], []) for e in range(3)]
    assert all(sorted(order) == list(range(n)) for order in epochs)  # each epoch a permutation
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]         # reshuffled every epoch
    assert data.batch_indices(n, batch_size, 0, seed + 1) != steps[0] or \
        data.batch_indices(n, batch_size, 1, seed + 1) != steps[1]   # the seed matters
    # a tail smaller than a batch is skipped, never returned short or repeated within the epoch
    tail = sum((data.batch_indices(10, 3, step, seed) for step in range(3)), [])
    assert len(tail) == len(set(tail)) == 9
    with pytest.raises(UserError, match="batch_size"):
        data.batch_indices(2, 3, 0, seed)


# ----------------------------------------------------------------------------------------------------
# The toy task

def test_toy_pairs():
    train = data.load_preferences("toy", "train", verbose=False)
    test = data.load_preferences("toy", "test", verbose=False)
    assert (len(train), len(test)) == (2000, 200)
    assert train == data.toy_pairs("train") and test == data.toy_pairs("test")  # deterministic
    for pair in train + test:
        # one prompt for both replies, and both replies address its person and answer its task
        assert pair["prompt"].startswith("\n\nHuman: Hi, I am ") and pair["prompt"].endswith(data.ASSISTANT)
        name = pair["prompt"].split("I am ")[1].split(".")[0]
        task = next(t for t in data.TOY_TASKS if t in pair["prompt"])
        for reply in (pair["chosen"], pair["rejected"]):
            assert reply.startswith(" ") and f", {name}. {data.TOY_ANSWER.format(task=task)} " in reply
        assert data.toy_reward(pair["prompt"], pair["chosen"]) == 1.0
        assert data.toy_reward(pair["prompt"], pair["rejected"]) == -1.0


def test_held_out_prompts_are_never_trained_on():
    train, test = data.toy_pairs("train"), data.toy_pairs("test")
    assert {p["prompt"] for p in train} & {p["prompt"] for p in test} == set()  # not one held-out prompt

    def combination(pair):
        return next(t for t in data.TOY_TASKS if t in pair["prompt"]), pair["prompt"].split("I am ")[1].split(".")[0]
    # stronger: no (task, name) of the test split is ever asked in training, yet every task and every name is
    assert {combination(p) for p in train} & {combination(p) for p in test} == set()
    assert {combination(p)[0] for p in train} == set(data.TOY_TASKS)
    assert {combination(p)[1] for p in train} == set(data.TOY_NAMES)
    assert len({p["prompt"] for p in test}) == 200  # 200 different requests


PROMPT = "\n\nHuman: Hi, I am Ana. How do I bake bread?\n\nAssistant:"


@pytest.mark.parametrize("reply, reward", [
    (" Sure, Ana. To bake bread, start small and practice daily. Good luck!", 1.0),  # a full polite reply
    (" Ugh, Ana. To bake bread, start small and practice daily. Leave me alone!", -1.0),  # a full rude one
    (" Sure, Ana. To bake bread, start small and practice daily. Leave me alone!", 0.0),  # one of each
    (" To bake bread, start small and practice daily.", 0.0),  # the answer, no tone
    (" Sure sure sure", -1.0),  # polite words, no answer
    (" Sure, Ana.", -1.0),  # the polite opener alone
    (" Sure, Ana. To bake bread, start", -1.0),  # cut short
    (" Sure, Ana. To fix a bike, start small and practice daily. Good luck!", -1.0),  # another task's answer
    (" Sure, Ana. To bake bread, start small and practice daily. To bake bread, start small and practice daily. "
     "Good luck!", -1.0),  # the answer repeated
    ("", -1.0),
])
def test_the_oracle_rewards_an_answer_by_its_tone_and_nothing_else(reply, reward):
    assert data.toy_reward(PROMPT, reply) == reward


def test_the_oracle_counts_whole_words_only():
    answer = " To bake bread, start small and practice daily."
    assert data.toy_reward(PROMPT, " I know nothing." + answer) == 0.0  # "no" inside "know" is not rude
    assert data.toy_reward(PROMPT, " No." + answer + " Go away!") == -1.0
    assert data.toy_reward(PROMPT, " Sure." + answer + " Good luck!") == 1.0
    assert data.toy_reward("a prompt that asks no toy task", answer) == -1.0  # nothing asked, nothing answered
