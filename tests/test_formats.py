"""machinery/formats.py: preference data as people have it. Every format and file type the loader reads,
the prompt/response boundary in each, held-out splits, the hub, and the one-line errors for data in none
of them; and python -m machinery.inspect_data."""
import gzip
import json
import os
import re
import subprocess
import sys
import time

import pytest

import data
import dpo
import sft
from conftest import HH_TEST, ROOT, run_script
from machinery import UserError
from machinery import formats as sources
from machinery import inspect_data
from machinery.inspect_data import main as inspect_main

EOS_TEXT = "<|endoftext|>"
HH_PROMPT = "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: how do I boil an egg?\n\nAssistant:"
CONTEXT = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"},
           {"role": "user", "content": "how do I boil an egg?"}]


def assistant(text):
    return {"role": "assistant", "content": text}


def only_pairs(outcomes):
    return [outcome for outcome in outcomes if isinstance(outcome, dict)]


@pytest.fixture(scope="module")
def tokenizer():
    return data.get_tokenizer()


def numbered_rows(n):
    return [{"prompt": f"\n\nHuman: question {i}\n\nAssistant:", "chosen": f" good {i}", "rejected": f" bad {i}"}
            for i in range(n)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_table(path, rows):
    """A .parquet or .csv file written by the datasets library, as a hub snapshot or a user's export is."""
    import datasets
    table = datasets.Dataset.from_list(rows)
    if path.suffix == ".parquet":
        table.to_parquet(str(path))
    else:
        table.to_csv(str(path), index=False)
    return path


# ----------------------------------------------------------------------------------------------------
# Text formats: where the prompt ends

def test_shared_start_text_is_cut_at_a_word_boundary(tokenizer):
    cases = [  # chosen, rejected -> prompt, chosen response, rejected response
        ("Q: what is 2+2?\nA: four", "Q: what is 2+2?\nA: five", "Q: what is 2+2?\nA:", " four", " five"),
        ("Q: a b", "Q: a\nb", "Q: a", " b", "\nb"),  # they differ at the whitespace itself
        ("User: hi\nBot:  sure thing", "User: hi\nBot: no", "User: hi\nBot:", "  sure thing", " no"),
        ("yes", "yeah", "", "yes", "yeah"),  # nothing in common: an empty prompt
    ]
    format_name, outcomes = sources.records_to_pairs([{"chosen": c, "rejected": r} for c, r, *_ in cases], data.HH)
    assert format_name == "shared-start text"
    assert outcomes == [{"prompt": p, "chosen": c, "rejected": r} for *_, p, c, r in cases]
    encode = tokenizer.encode_ordinary
    for pair in outcomes:
        for response in ("chosen", "rejected"):
            # no word is cut, so the prompt's tokens then the response's are the tokens of the whole text
            assert encode(pair["prompt"]) + encode(pair[response]) == encode(pair["prompt"] + pair[response])
    # a chosen text that is the start of the rejected one leaves nothing to prefer in it: dropped
    assert sources.records_to_pairs([{"chosen": "A: yes", "rejected": "A: yes indeed"}], data.HH)[1] == ["empty response"]


def test_hh_dialogues_split_at_the_last_assistant_marker_not_the_shared_start():
    # the two replies share their first word; the HH split keeps it in both responses
    record = {"chosen": HH_PROMPT + " I think ten minutes.", "rejected": HH_PROMPT + " I do not know."}
    format_name, outcomes = sources.records_to_pairs([record], data.HH)
    assert format_name == "HH dialogues"
    assert outcomes == [{"prompt": HH_PROMPT, "chosen": " I think ten minutes.", "rejected": " I do not know."}]


# ----------------------------------------------------------------------------------------------------
# Conversational: message lists rendered as HH text

def test_a_conversation_renders_to_the_hh_text_pair_and_its_tokens(tokenizer):
    expected = {"prompt": HH_PROMPT, "chosen": " Ten minutes.", "rejected": " No."}
    hh_text = {"chosen": HH_PROMPT + " Ten minutes.", "rejected": HH_PROMPT + " No."}
    implicit = {"chosen": CONTEXT + [assistant("Ten minutes.")], "rejected": CONTEXT + [assistant("No.")]}
    explicit = {"prompt": CONTEXT, "chosen": [assistant("Ten minutes.")], "rejected": [assistant("No.")]}
    # UltraFeedback-binarized's shape: the first user message repeated as text beside whole conversations
    repeated = {"prompt": "hi there", **implicit}
    assert sources.records_to_pairs([hh_text], data.HH) == ("HH dialogues", [expected])
    for record in (implicit, explicit, repeated):
        assert sources.records_to_pairs([record], data.HH) == ("conversational", [expected])
    assert sources.render_hh(CONTEXT, data.HH) == HH_PROMPT
    tokens = data.tokenize_pairs([expected], tokenizer=tokenizer, verbose=False)
    assert tokens == data.tokenize_pairs(sources.records_to_pairs([hh_text], data.HH)[1], tokenizer=tokenizer, verbose=False)
    # a text prompt beside assistant-only lists is the user's message
    single = {"prompt": "how do I boil an egg?", "chosen": [assistant("Ten minutes.")], "rejected": [assistant("No.")]}
    assert sources.records_to_pairs([single], data.HH)[1][0]["prompt"] == "\n\nHuman: how do I boil an egg?\n\nAssistant:"


def hh_to_messages(text):
    """An HH dialogue as messages: each marker, one space, then the message's content."""
    pieces = re.split(r"(\n\nHuman:|\n\nAssistant:)", text)
    assert pieces[0] == ""
    messages = []
    for marker, content in zip(pieces[1::2], pieces[2::2]):
        assert content.startswith(" ")
        messages.append({"role": "user" if marker == data.HUMAN else "assistant", "content": content[1:]})
    return messages


def test_the_hh_excerpt_as_conversations_gives_the_same_pairs_and_tokens(tokenizer):
    with gzip.open(HH_TEST, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    conversations = [{"chosen": hh_to_messages(r["chosen"]), "rejected": hh_to_messages(r["rejected"])}
                     for r in records]
    hh_format, hh_outcomes = sources.records_to_pairs(records, data.HH)
    conversation_format, conversation_outcomes = sources.records_to_pairs(conversations, data.HH)
    assert (hh_format, conversation_format) == ("HH dialogues", "conversational")
    assert conversation_outcomes == hh_outcomes  # all 512, the one dropped pair included
    assert len(only_pairs(hh_outcomes)) == 511
    hh_tokens = data.tokenize_pairs(only_pairs(hh_outcomes), tokenizer=tokenizer, verbose=False)
    assert data.tokenize_pairs(only_pairs(conversation_outcomes), tokenizer=tokenizer, verbose=False) == hh_tokens


def test_conversation_rules_system_message_and_drop_reasons():
    system = {"role": "system", "content": "Answer briefly."}
    user = {"role": "user", "content": "hi"}
    records = [
        {"chosen": [system, user, assistant("hello")], "rejected": [system, user, assistant("go")]},
        {"chosen": [user, assistant("hello")], "rejected": [{"role": "user", "content": "yo"}, assistant("go")]},
        {"chosen": [user, assistant("hello"), user], "rejected": [user, assistant("go")]},
        {"chosen": [user, system, assistant("hello")], "rejected": [user, system, assistant("go")]},
        {"chosen": [{"role": "tool", "content": "42"}, assistant("hello")],
         "rejected": [{"role": "tool", "content": "42"}, assistant("go")]},
        {"chosen": [user, assistant("same")], "rejected": [user, assistant("same")]},
    ]
    format_name, outcomes = sources.records_to_pairs(records, data.HH)
    assert format_name == "conversational"
    # a system message starts the prompt as plain text: HH has no system turn to put it in
    assert outcomes == [{"prompt": "Answer briefly.\n\nHuman: hi\n\nAssistant:", "chosen": " hello", "rejected": " go"},
                        "prompt mismatch", "no assistant turn", "system message not first", "unknown role",
                        "identical responses"]


def test_a_malformed_message_names_its_record_and_position():
    bad = {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant"}], "rejected": []}
    with pytest.raises(UserError, match=r'^record 2: chosen message 2 is not a \{"role": \.\.\., "content": text\}'):
        sources.records_to_pairs([{"chosen": [], "rejected": []}, bad], data.HH)


# ----------------------------------------------------------------------------------------------------
# Stanford SHP

def test_stanford_shp_takes_the_labelled_reply_and_drops_weak_preferences():
    question = {"history": "Why is the sky blue?", "human_ref_A": "Rayleigh scattering.", "human_ref_B": "Magic."}
    records = [{**question, "labels": 1, "score_A": 10, "score_B": 2},
               {**question, "labels": 0, "score_A": 3, "score_B": 9},     # B preferred
               {**question, "labels": 1, "score_A": 5, "score_B": 3},     # 5/3 < 2: a weak preference
               {**question, "labels": 1}]                                  # without scores: no filter
    format_name, outcomes = sources.records_to_pairs(records, data.HH)
    prompt = "\n\nHuman: Why is the sky blue?\n\nAssistant:"
    assert format_name == "Stanford SHP"
    assert outcomes == [{"prompt": prompt, "chosen": " Rayleigh scattering.", "rejected": " Magic."},
                        {"prompt": prompt, "chosen": " Magic.", "rejected": " Rayleigh scattering."},
                        "score ratio below 2",
                        {"prompt": prompt, "chosen": " Rayleigh scattering.", "rejected": " Magic."}]
    with pytest.raises(UserError, match="record 1: field 'labels' is 2; Stanford SHP uses 1"):
        sources.records_to_pairs([{**question, "labels": 2}], data.HH)


# ----------------------------------------------------------------------------------------------------
# Files and directories

def test_every_file_type_gives_the_same_pairs(tmp_path):
    rows = numbered_rows(20)
    rows[0]["prompt"] = ""    # csv: an empty cell is an empty prompt, not a missing value
    rows[1]["chosen"] = "NA"  # csv: text that pandas would otherwise read as a missing value
    expected = rows[:19]      # every 20th held out for test
    text = "".join(json.dumps(row) + "\n" for row in rows)
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    (tmp_path / "list.json").write_text(json.dumps(rows, indent=1))
    (tmp_path / "lines.json").write_text(text)  # Stanford SHP's .json files hold one object a line
    for name in ("pairs.jsonl.gz", "pairs.json.gz"):
        (tmp_path / name).write_bytes(gzip.compress(text.encode()))
    write_table(tmp_path / "pairs.parquet", rows)
    write_table(tmp_path / "pairs.csv", rows)
    (tmp_path / "pairs.csv.gz").write_bytes(gzip.compress((tmp_path / "pairs.csv").read_bytes()))
    names = ["pairs.jsonl", "pairs.jsonl.gz", "list.json", "lines.json", "pairs.json.gz", "pairs.parquet",
             "pairs.csv", "pairs.csv.gz"]
    for name in names:
        assert data.load_preferences(str(tmp_path / name), "train", verbose=False) == expected, name
    # message lists survive parquet (lists of structs) as they are
    conversations = [{"prompt": [{"role": "user", "content": f"question {i}"}], "chosen": [assistant(f"good {i}")],
                      "rejected": [assistant(f"bad {i}")]} for i in range(20)]
    from_parquet = data.load_preferences(str(write_table(tmp_path / "chat.parquet", conversations)), "test",
                                         verbose=False)
    assert from_parquet == [{"prompt": "\n\nHuman: question 19\n\nAssistant:", "chosen": " good 19",
                             "rejected": " bad 19"}]


def test_directory_layouts(tmp_path, capsys):
    rows = numbered_rows(50)
    # split files of different types
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_jsonl(mixed / "train.jsonl", rows[:40])
    write_table(mixed / "test.parquet", rows[40:])
    assert data.load_preferences(str(mixed), "train", verbose=False) == rows[:40]
    assert data.load_preferences(str(mixed), "test", verbose=False) == rows[40:]
    # the hub's layout: shards under data/, read in order; metadata beside them is not a split
    hub = tmp_path / "hub"
    (hub / "data").mkdir(parents=True)
    (hub / "README.md").write_text("a dataset card")
    (hub / "dataset_infos.json").write_text("{}")
    write_table(hub / "data" / "train_prefs-00000-of-00002.parquet", rows[:20])
    write_table(hub / "data" / "train_prefs-00001-of-00002.parquet", rows[20:40])
    write_table(hub / "data" / "test_prefs-00000-of-00001.parquet", rows[40:])
    assert data.load_preferences(str(hub), "train", split_name="train_prefs") == rows[:40]
    assert data.load_preferences(str(hub), "test", split_name="test_prefs") == rows[40:]
    assert capsys.readouterr().out.splitlines()[0] == (f"data: {hub} [train_prefs]: kept 40 pairs, dropped 0 "
                                                       "(none); format: prompt/chosen/rejected text")
    with pytest.raises(UserError, match=r"hub has no split 'train'; its splits are test_prefs, train_prefs$"):
        data.load_preferences(str(hub), "train")
    # a data/ folder that holds no split files is not the hub's layout: the split files beside it count
    (mixed / "data").mkdir()
    (mixed / "data" / "notes.txt").write_text("how the pairs were collected")
    assert data.load_preferences(str(mixed), "test", verbose=False) == rows[40:]
    # one file, and toy, have no named splits: their train and test are fixed
    with pytest.raises(UserError, match="toy has no split 'train_prefs'"):
        data.load_preferences("toy", "train", split_name="train_prefs")
    with pytest.raises(UserError, match="train.jsonl is one file, so it has no split 'train_prefs'"):
        data.load_preferences(str(mixed / "train.jsonl"), "train", split_name="train_prefs")


def test_hub_splits_are_chosen_by_name_and_a_single_split_is_held_out(tmp_path):
    # datasets reads a local folder in the hub's layout exactly as it reads a hub repository
    rows = numbered_rows(30)
    write_table(tmp_path / "data" / "train_prefs-00000-of-00001.parquet", rows[:20])
    write_table(tmp_path / "data" / "test_prefs-00000-of-00001.parquet", rows[20:])
    records, held_out = sources._load_hub(str(tmp_path), "test_prefs")
    assert [record for _, record in records] == rows[20:] and not held_out
    assert records[0][0] == f"{tmp_path} [test_prefs] row 1"
    with pytest.raises(UserError, match=r"has no split 'test'; its splits are "):
        sources._load_hub(str(tmp_path), "test")
    (tmp_path / "data" / "test_prefs-00000-of-00001.parquet").unlink()
    records, held_out = sources._load_hub(str(tmp_path), "test")  # train_prefs only: load_preferences holds out
    assert [record for _, record in records] == rows[:20] and held_out


# ----------------------------------------------------------------------------------------------------
# Data in no known format, or in several

def test_fields_of_no_known_format_are_named(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(UserError) as error:
        data.load_preferences(str(path), "train")
    message = str(error.value)
    assert message.startswith(f"{path}:1: fields question, answer match no known format; known: prompt/chosen/")
    assert "Stanford SHP (history, human_ref_A, human_ref_B, labels)" in message and "\n" not in message


@pytest.mark.parametrize("odd_one, odd_format", [
    ({"chosen": [assistant("a")], "rejected": [assistant("b")]}, "conversational"),
    ({"chosen": "a", "rejected": "b"}, "chosen/rejected text"),
])
def test_a_mixture_of_formats_names_the_first_record_that_differs(tmp_path, odd_one, odd_format):
    path = write_jsonl(tmp_path / "mixed.jsonl", numbered_rows(2) + [odd_one] + numbered_rows(20))
    with pytest.raises(UserError) as error:
        data.load_preferences(str(path), "train")
    assert str(error.value) == (f"{path}:3: a record in the {odd_format} format, but {path}:1 is in the "
                                "prompt/chosen/rejected text format; one source holds one format")


def test_unreadable_tables_are_one_line_with_nothing_else_on_stderr(tmp_path, capfd):
    broken_parquet = tmp_path / "broken.parquet"
    broken_parquet.write_bytes(b"PAR1 but not really a parquet file")
    broken_csv = tmp_path / "broken.csv"
    broken_csv.write_text('prompt,chosen,rejected\n"unclosed,a,b\n')
    cases = [(broken_parquet, "broken.parquet: not a readable parquet file (ArrowInvalid: "),
             (broken_csv, "broken.csv: not a readable csv file (ParserError: ")]
    for path, expected in cases:
        with pytest.raises(SystemExit) as exit_info:
            inspect_main(["--data", str(path)])
        message = str(exit_info.value.code)
        assert message.startswith(f"error: {tmp_path}/") and expected in message and "\n" not in message
    # datasets logs read errors itself; the loader silences that, so the one line is all a user sees
    assert capfd.readouterr().err == ""


def test_inspect_shows_the_format_and_the_rendered_first_pair(tmp_path, capsys):
    conversations = [{"chosen": CONTEXT + [assistant(f"Ten minutes, {i}.")], "rejected": CONTEXT + [assistant("No.")]}
                     for i in range(20)]
    path = write_jsonl(tmp_path / "chat.jsonl", conversations)
    inspect_main(["--data", str(path), "--max_len", "64"])
    lines = capsys.readouterr().out.splitlines()[1:]  # after the token budget's line
    assert lines[0] == (f"data: {path} [train]: kept 19 pairs, dropped 0 (none); format: conversational; "
                        "one file: every 20th record held out for test")
    assert lines[2:6] == ["first pair as text, split where training splits it:",
                          f"prompt:    {HH_PROMPT!r}",
                          f"chosen:    {' Ten minutes, 0.'!r}",
                          f"rejected:  {' No.'!r}"]


# ----------------------------------------------------------------------------------------------------
# Sources: files and directories, held-out splits

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
                                       "format: HH dialogues; one file: every 20th record held out for test\n")


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


def bad_not_utf8(tmp):
    path = tmp / "latin.jsonl"
    line = json.dumps(numbered_rows(1)[0]) + "\n"
    path.write_bytes((line * 2).encode() + '{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'.encode("latin-1"))
    return path, ["latin.jsonl:3: not UTF-8 text (byte 0xe9); save the file as UTF-8"]


def bad_pretty_object(tmp):
    path = tmp / "one.json"
    path.write_text(json.dumps(numbered_rows(1)[0], indent=2))  # valid JSON, but one pair, not a list of them
    return path, ["one.json holds one JSON object, not a list of records"]


def bad_pretty_jsonl(tmp):
    path = tmp / "one.jsonl"
    path.write_text(json.dumps(numbered_rows(1)[0], indent=2))
    return path, ["one.jsonl holds one JSON value over several lines", "write each object on one line"]


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


IN_PROCESS_CASES = [bad_not_utf8, bad_pretty_object, bad_pretty_jsonl,
                    bad_empty_file, bad_missing_field, bad_non_string, bad_directory, bad_prompt_type,
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
    result = run_script("machinery.inspect_data", "--data", path, timeout=120, module=True)
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
    result = run_script("machinery.inspect_data", "--data", "Anthropic/hh-rlhf:helpful-base",
                        env={"HF_HOME": str(tmp_path)}, timeout=120, module=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: could not load Anthropic/hh-rlhf [train] from the Hugging Face hub")
    assert "network" in lines[0] and "local directory" in lines[0]


# ----------------------------------------------------------------------------------------------------
# python -m machinery.inspect_data

def test_inspect_toy_cli(tokenizer):
    result = run_script("machinery.inspect_data", "--data", "toy", timeout=120, module=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # the toy task is inspected at the demo's budget, the one sft.py and dpo.py --demo train with
    assert lines[0] == f"token budget: --max_len {sft.DEMO['max_len']}, --max_prompt_len {sft.DEMO['max_len'] // 2}"
    assert (inspect_data.DEMO_MAX_LEN, inspect_data.MAX_LEN) == (dpo.DEMO["max_len"], dpo.DEFAULTS["max_len"])
    assert sft.DEFAULTS["max_len"] == inspect_data.MAX_LEN
    tokenized = data.tokenize_pairs(data.toy_pairs("train"), 64, 32, tokenizer, verbose=False)
    assert lines[1] == f"data: toy [train]: {len(data.toy_pairs('train'))} pairs, made by data.toy_pairs"
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
    # `python -m machinery.inspect_data | head`: once head has stopped reading, stop without a BrokenPipeError
    # traceback. Closing our end before the child writes makes its writes fail, every time; stdout
    # buffered, as users have it, so the failure comes at the last flush, the case Python reports at exit.
    environment = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    process = subprocess.Popen([sys.executable, "-m", "machinery.inspect_data", "--data", "toy"],
                               cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()
    _, stderr = process.communicate(timeout=120)
    assert stderr.decode() == "" and process.returncode == 1


def test_help_shows_every_default_once(capsys):
    with pytest.raises(SystemExit) as exit_info:
        inspect_main(["--help"])
    assert exit_info.value.code == 0
    options = re.split(r"\n  (?=-)", capsys.readouterr().out.split("\noptions:\n")[1])
    assert [option.split()[0] for option in options] == ["-h,", "--data", "--split", "--split_name", "--max_len",
                                                         "--max_prompt_len"]
    for option in options[1:]:  # all but --help
        assert " ".join(option.split()).count("(default: ") == 1, option


def test_a_directory_of_one_split_file_says_which_split_it_trains_on(tmp_path, capsys):
    # a directory holding only test.jsonl: read under the default split names, every 20th pair held out,
    # and the summary line says the file is the 'test' split; a split name it does not hold is refused
    write_jsonl(tmp_path / "test.jsonl", numbered_rows(40))
    assert len(data.load_preferences(str(tmp_path), "train")) == 38
    assert f"the only split of {tmp_path} is 'test': every 20th record held out for test" in capsys.readouterr().out
    with pytest.raises(UserError, match="has no split 'train_prefs': it holds only 'test' \\(test.jsonl\\)"):
        data.load_preferences(str(tmp_path), "train", split_name="train_prefs")
