"""data.py: sources, the prompt/response split, truncation, masks and batches, and the errors a user sees.

Most DPO bugs are data bugs, so these tests check exact numbers on real HH-RLHF pairs (the excerpt in
examples/) and exact tensors on hand-made pairs, rather than only that something ran. The formats and
file types a source may come in are tested in test_formats.py.
"""
import collections
import gzip
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

import data
from conftest import HH_TEST, ROOT, run_script
from model import IGNORE_INDEX
from runs import UserError

HH_DIR = os.path.dirname(HH_TEST)
EOS_TEXT = "<|endoftext|>"


@pytest.fixture(scope="module")
def tokenizer():
    return data.get_tokenizer()


@pytest.fixture(scope="module")
def hh_records():
    with gzip.open(HH_TEST, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def hh_pairs(hh_records):
    format_name, outcomes = data.records_to_pairs(hh_records)
    return [outcome for outcome in outcomes if isinstance(outcome, dict)]


@pytest.fixture(scope="module")
def hh_full(hh_pairs, tokenizer):
    """HH pairs tokenized with room for everything: the longest prompt + response + EOS is 938 tokens,
    so with max_len 1100 neither branch of the truncation can fire."""
    return data.tokenize_pairs(hh_pairs, max_len=1100, max_prompt_len=1000, tokenizer=tokenizer, verbose=False)


def as_tuples(pairs):
    return [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def numbered_rows(n):
    return [{"prompt": f"\n\nHuman: question {i}\n\nAssistant:", "chosen": f" good {i}", "rejected": f" bad {i}"}
            for i in range(n)]


# ----------------------------------------------------------------------------------------------------
# Real HH-RLHF pairs: the split, the round trip, and the trained tokens

def test_hh_split_counts(hh_records):
    # the numbers of the excerpt's README: 512 records, one with an empty chosen reply (line 87)
    format_name, outcomes = data.records_to_pairs(hh_records)
    assert format_name == "HH dialogues"
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
            input_ids, labels = data.example(tokens["prompt"], tokens[field])
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
    note = "format: HH dialogues; every 20th record held out for test"
    assert lines == [f"data: {HH_DIR} [train]: kept 486 pairs, dropped 1 (1 empty response); {note}",
                     f"data: {HH_DIR} [test]: kept 25 pairs, dropped 0 (none); {note}"]
    _, held_out = data.records_to_pairs(hh_records[19::20])
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
                       f"{len(cut)} prompts cut to their end, {responses_cut} pairs with responses cut to fit"]


def test_tokenize_pairs_rejects_a_prompt_budget_that_leaves_no_room(tokenizer):
    with pytest.raises(UserError, match="max_prompt_len"):
        data.tokenize_pairs(data.toy_pairs("train", n=1), max_len=64, max_prompt_len=64, tokenizer=tokenizer)


def test_empty_prompt_starts_from_eos(tokenizer):
    # without a first prompt token the shift in example() would be off by one and the labels one too long
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
    chosen = [data.example(t["prompt"], t["chosen"]) for t in tokenized]
    rejected = [data.example(t["prompt"], t["rejected"]) for t in tokenized]
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
# Sources

def test_jsonl_with_prompt_field_holds_out_every_20th(tmp_path):
    rows = numbered_rows(40)
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    assert data.load_preferences(str(path), "train", verbose=False) == [r for i, r in enumerate(rows) if i not in (19, 39)]
    assert data.load_preferences(str(path), "test", verbose=False) == [rows[19], rows[39]]


def test_jsonl_with_hh_dialogues(tmp_path, capsys):
    history = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:"
    path = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": history + " see you", "rejected": history + " go away"},
        {"chosen": "\n\nHuman: no reply marker", "rejected": "\n\nHuman: no reply marker"},
    ] * 10)
    pairs = data.load_preferences(str(path), "train")
    assert pairs == [{"prompt": history, "chosen": " see you", "rejected": " go away"}] * 10
    assert capsys.readouterr().out == (f"data: {path} [train]: kept 10 pairs, dropped 9 (9 no assistant turn); "
                                       "format: HH dialogues; every 20th record held out for test\n")


def test_json_list(tmp_path):
    rows = numbered_rows(20)
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(rows, indent=2))
    assert data.load_preferences(str(path), "train", verbose=False) == rows[:19]


def test_directory_with_both_splits_has_no_holdout(tmp_path):
    rows = numbered_rows(45)
    write_jsonl(tmp_path / "train.jsonl", rows[:40])
    write_jsonl(tmp_path / "test.jsonl", rows[40:])
    assert data.load_preferences(str(tmp_path), "train", verbose=False) == rows[:40]  # 20th and 40th kept
    assert data.load_preferences(str(tmp_path), "test", verbose=False) == rows[40:]


def test_identical_responses_are_dropped_with_a_reason(tmp_path, capsys):
    # nothing to prefer: such a pair's DPO loss is ln 2 with no gradient, and SFT would learn it twice
    rows = numbered_rows(20)
    rows[3]["rejected"] = rows[3]["chosen"]
    hh = "\n\nHuman: hi\n\nAssistant:"
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", [{"chosen": hh + " same", "rejected": hh + " same"},
                                         {"chosen": hh + " yes", "rejected": hh + " no"}])
    train = data.load_preferences(str(tmp_path), "train")
    test = data.load_preferences(str(tmp_path), "test")
    assert train == rows[:3] + rows[4:] and test == [{"prompt": hh, "chosen": " yes", "rejected": " no"}]
    assert capsys.readouterr().out.splitlines() == [
        f"data: {tmp_path} [train]: kept 19 pairs, dropped 1 (1 identical responses); "
        "format: prompt/chosen/rejected text",
        f"data: {tmp_path} [test]: kept 1 pairs, dropped 1 (1 identical responses); format: HH dialogues"]


def test_a_source_too_small_to_hold_out_says_so(tmp_path):
    path = write_jsonl(tmp_path / "few.jsonl", numbered_rows(19))
    for split in ("train", "test"):  # refused for both, so a run stops before it trains on anything
        with pytest.raises(UserError, match="few.jsonl: 19 pairs: need at least 20 to hold out every 20th"):
            data.load_preferences(str(path), split)
    write_jsonl(tmp_path / "few.jsonl", numbered_rows(20))
    assert data.load_preferences(str(path), "test", verbose=False) == [numbered_rows(20)[19]]


def test_toy_pairs_and_oracle_reward():
    train = data.load_preferences("toy", "train", verbose=False)
    test = data.load_preferences("toy", "test", verbose=False)
    assert (len(train), len(test)) == (2000, 200)
    assert train == data.toy_pairs("train") and test == data.toy_pairs("test")  # deterministic
    assert train[:200] != test
    for pair in train + test:
        # one prompt for both replies, and both replies address its person and task
        assert pair["prompt"].startswith("\n\nHuman: Hi, I am ") and pair["prompt"].endswith(data.ASSISTANT)
        name = pair["prompt"].split("I am ")[1].split(".")[0]
        task = next(t for t in data.TOY_TASKS if t in pair["prompt"])
        for reply in (pair["chosen"], pair["rejected"]):
            assert f", {name}. To {task}, " in reply
        chosen, rejected = data.toy_reward(pair["chosen"]), data.toy_reward(pair["rejected"])
        assert -1 <= rejected < 0 < chosen <= 1
    assert data.toy_reward(" Sure, Ana. Leave me alone!") == 0.0  # one polite, one rude phrase
    assert data.toy_reward("") == 0.0


# ----------------------------------------------------------------------------------------------------
# Errors: one line naming file, line and field, in-process and through the CLI

def text_file(name, text, *expected):
    """A bad-input case: a file `name` holding `text`, and the parts its one-line error must show."""
    def case(tmp):
        path = tmp / name
        path.write_text(text)
        return path, list(expected)
    case.__name__ = "bad_" + name.replace(".", "_")
    return case


bad_empty_file = text_file("empty.jsonl", "\n  \n", "empty.jsonl is empty")
bad_not_json = text_file("broken.jsonl", json.dumps(numbered_rows(1)[0]) + "\n\n{chosen: oops\n",
                         "broken.jsonl:3: not valid JSON")  # blank lines still count
bad_missing_field = text_file("fields.jsonl", '{"chosen": "a", "rejected": "b"}\n{"chosen": "a"}\n',
                              "fields.jsonl:2: missing field 'rejected'")
bad_non_string = text_file("types.jsonl", '{"prompt": "p", "chosen": ["a"], "rejected": "b"}\n',
                           "types.jsonl:1: field 'chosen' is list and 'rejected' is str; both must be text, or both lists")
bad_prompt_type = text_file("prompt.jsonl", '{"prompt": 3, "chosen": "a", "rejected": "b"}\n',
                            "prompt.jsonl:1: field 'prompt' is int, expected text")
bad_json_item = text_file("list.json", json.dumps([{"chosen": "a", "rejected": "b"}, {"rejected": "b"}], indent=2),
                          "list.json: item 2: missing field 'chosen'")  # an item number, not a line
bad_json_scalar = text_file("text.json", json.dumps("chosen and rejected"),
                            "text.json:1: expected an object with chosen and rejected, found str")
bad_line_not_object = text_file("array.jsonl", '["a", "b"]\n',
                                "array.jsonl:1: expected an object with chosen and rejected, found list")
bad_unknown_file_type = text_file("pairs.txt", json.dumps(numbered_rows(1)[0]) + "\n",
                                  "pairs.txt: unknown file type; data files are .jsonl, .jsonl.gz, .json")


def bad_missing_file(tmp):
    return tmp / "nowhere.jsonl", ["nowhere.jsonl does not exist"]


def bad_directory(tmp):
    (tmp / "README.md").write_text("pairs are elsewhere")  # a directory without split files
    (tmp / "helpful-base").mkdir()
    return tmp, [f"{tmp} holds no split files (train.jsonl,", "its subdirectories: helpful-base"]


def bad_ambiguous_directory(tmp):
    write_jsonl(tmp / "train.jsonl", numbered_rows(20))
    with gzip.open(tmp / "train.jsonl.gz", "wt") as f:  # a compressed copy left beside it: which is the data?
        f.write("".join(json.dumps(row) + "\n" for row in numbered_rows(30)))
    return tmp, [f"{tmp}: split 'train' is in 2 files of different types (train.jsonl, train.jsonl.gz); keep one"]


def bad_truncated_gzip(tmp):
    path = tmp / "cut.jsonl.gz"
    whole = gzip.compress("".join(json.dumps(row) + "\n" for row in numbered_rows(200)).encode())
    path.write_bytes(whole[:len(whole) // 2])  # an interrupted download or copy
    return path, ["cut.jsonl.gz ends before its gzip data does (truncated?)"]


# the command line is checked on two cases (each starts a Python process); the rest in-process
CLI_CASES = [bad_missing_file, bad_not_json]


IN_PROCESS_CASES = [bad_empty_file, bad_missing_field, bad_non_string, bad_directory, bad_prompt_type,
                    bad_ambiguous_directory, bad_truncated_gzip, bad_json_item, bad_json_scalar, bad_line_not_object,
                    bad_unknown_file_type]


@pytest.mark.parametrize("case", CLI_CASES + IN_PROCESS_CASES,
                         ids=lambda case: case.__name__)
def test_bad_input_is_one_line_user_error(case, tmp_path):
    path, expected = case(tmp_path)
    with pytest.raises(UserError) as error:
        data.load_preferences(str(path), "train")
    message = str(error.value)
    assert "\n" not in message
    for part in expected:
        assert part in message


@pytest.mark.parametrize("case", CLI_CASES, ids=lambda case: case.__name__)
def test_bad_input_through_the_cli(case, tmp_path):
    path, expected = case(tmp_path)
    result = run_script("data.py", "--inspect", "--data", path, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    for part in expected:
        assert part in lines[0]


def test_hub_name_without_network_says_what_to_do():
    # conftest sets HF_DATASETS_OFFLINE/HF_HUB_OFFLINE: without them huggingface_hub retries for ~25 s
    start = time.perf_counter()
    with pytest.raises(UserError) as error:
        data.load_preferences("nanodpo-tests/no-such-dataset", "train")  # a name no cache can hold
    assert time.perf_counter() - start < 15
    message = str(error.value)
    assert "\n" not in message and "network" in message
    assert "local directory" in message and ".jsonl" in message


def test_hub_name_without_network_through_the_cli(tmp_path):
    # an empty HF_HOME, so a dataset cached on this machine cannot answer instead of the hub
    result = run_script("data.py", "--inspect", "--data", "Anthropic/hh-rlhf:helpful-base",
                        env={"HF_HOME": str(tmp_path)}, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: could not load Anthropic/hh-rlhf [train] from the Hugging Face hub")
    assert "network" in lines[0] and "local directory" in lines[0]


# ----------------------------------------------------------------------------------------------------
# python data.py --inspect

def test_inspect_toy_cli(tokenizer):
    result = run_script("data.py", "--inspect", "--data", "toy", timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    tokenized = data.tokenize_pairs(data.toy_pairs("train"), 512, 256, tokenizer, verbose=False)
    assert lines[0] == "data: toy [train]: kept 2000 pairs, dropped 0 (none); format: toy"
    # the percentile table: p50 <= p90 <= p99 <= max per field, max matching our own count
    header = lines.index("token lengths    p50    p90    p99    max")
    for line, field in zip(lines[header + 1:header + 4], ("prompt", "chosen", "rejected")):
        name, *numbers = line.split()
        numbers = [int(x) for x in numbers]
        assert name == field and numbers == sorted(numbers)
        assert numbers[-1] == max(len(t[field]) for t in tokenized)
    # the first pair as text, split where training splits it
    text_view = lines.index("first pair as text, split where training splits it:")
    pair = data.toy_pairs("train")[0]
    assert lines[text_view + 1:text_view + 4] == [f"{field + ':':<10} {pair[field]!r}"
                                                  for field in ("prompt", "chosen", "rejected")]
    # the token-by-token view of the first pair: one line per input position, prompt untrained
    first = tokenized[0]
    view = lines[lines.index(next(l for l in lines if l.startswith("first pair, prompt + chosen"))) + 1:]
    assert len(view) == len(first["prompt"]) + len(first["chosen"]) - 1
    assert sum(line.endswith("-> .") for line in view) == len(first["prompt"]) - 1
    assert view[0].split()[:2] == ["0", str(first["prompt"][0])]
    assert view[-1].endswith(f"-> {EOS_TEXT!r}")


def test_inspect_into_a_closed_pipe_exits_quietly():
    # `python data.py --inspect | head`: once head has stopped reading, stop without a BrokenPipeError
    # traceback. Closing our end before the child writes makes its writes fail, every time; stdout
    # buffered, as users have it, so the failure comes at the last flush, the case Python reports at exit.
    environment = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "data.py"), "--inspect", "--data", "toy"],
                               cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()
    _, stderr = process.communicate(timeout=120)
    assert stderr.decode() == "" and process.returncode == 1


def test_help_shows_every_default_once(capsys):
    with pytest.raises(SystemExit) as exit_info:
        data.main(["--help"])
    assert exit_info.value.code == 0
    options = re.split(r"\n  (?=-)", capsys.readouterr().out.split("\noptions:\n")[1])
    assert [option.split()[0] for option in options] == ["-h,", "--inspect", "--data", "--split", "--split_name",
                                                         "--max_len", "--max_prompt_len"]
    for option in options[1:]:  # all but --help
        assert " ".join(option.split()).count("(default: ") == 1, option


def test_cli_without_inspect_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        data.main(["--data", "toy"])
    assert exit_info.value.code == 2
    assert "nothing to do: pass --inspect" in capsys.readouterr().err


def test_toy_reward_counts_whole_words_only():
    assert data.toy_reward("I know nothing about it.") == 0.0  # "no" inside "know" and "nothing" is not rude
    assert data.toy_reward("No. Go away!") == -1.0 and data.toy_reward("Sure, good luck!") == 1.0
