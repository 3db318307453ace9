"""Preference data as people have it: every format and file type the loader reads, the prompt/response
boundary in each, and the one-line errors for data in none of them (data.py, Sources and Records)."""
import gzip
import json
import re

import pytest

import data
import sources
from conftest import HH_TEST
from runs import UserError

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
    format_name, outcomes = data.records_to_pairs([{"chosen": c, "rejected": r} for c, r, *_ in cases])
    assert format_name == "shared-start text"
    assert outcomes == [{"prompt": p, "chosen": c, "rejected": r} for *_, p, c, r in cases]
    encode = tokenizer.encode_ordinary
    for pair in outcomes:
        for response in ("chosen", "rejected"):
            # no word is cut, so the prompt's tokens then the response's are the tokens of the whole text
            assert encode(pair["prompt"]) + encode(pair[response]) == encode(pair["prompt"] + pair[response])
    # a chosen text that is the start of the rejected one leaves nothing to prefer in it: dropped
    assert data.records_to_pairs([{"chosen": "A: yes", "rejected": "A: yes indeed"}])[1] == ["empty response"]


def test_hh_dialogues_split_at_the_last_assistant_marker_not_the_shared_start():
    # the two replies share their first word; the HH split keeps it in both responses
    record = {"chosen": HH_PROMPT + " I think ten minutes.", "rejected": HH_PROMPT + " I do not know."}
    format_name, outcomes = data.records_to_pairs([record])
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
    assert data.records_to_pairs([hh_text]) == ("HH dialogues", [expected])
    for record in (implicit, explicit, repeated):
        assert data.records_to_pairs([record]) == ("conversational", [expected])
    assert data.render_hh(CONTEXT) == HH_PROMPT
    tokens = data.tokenize_pairs([expected], tokenizer=tokenizer, verbose=False)
    assert tokens == data.tokenize_pairs(data.records_to_pairs([hh_text])[1], tokenizer=tokenizer, verbose=False)
    # a text prompt beside assistant-only lists is the user's message
    single = {"prompt": "how do I boil an egg?", "chosen": [assistant("Ten minutes.")], "rejected": [assistant("No.")]}
    assert data.records_to_pairs([single])[1][0]["prompt"] == "\n\nHuman: how do I boil an egg?\n\nAssistant:"


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
    hh_format, hh_outcomes = data.records_to_pairs(records)
    conversation_format, conversation_outcomes = data.records_to_pairs(conversations)
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
    format_name, outcomes = data.records_to_pairs(records)
    assert format_name == "conversational"
    # a system message starts the prompt as plain text: HH has no system turn to put it in
    assert outcomes == [{"prompt": "Answer briefly.\n\nHuman: hi\n\nAssistant:", "chosen": " hello", "rejected": " go"},
                        "prompt mismatch", "no assistant turn", "system message not first", "unknown role",
                        "identical responses"]


def test_a_malformed_message_names_its_record_and_position():
    bad = {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant"}], "rejected": []}
    with pytest.raises(UserError, match=r'^record 2: chosen message 2 is not a \{"role": \.\.\., "content": text\}'):
        data.records_to_pairs([{"chosen": [], "rejected": []}, bad])


# ----------------------------------------------------------------------------------------------------
# Stanford SHP

def test_stanford_shp_takes_the_labelled_reply_and_drops_weak_preferences():
    question = {"history": "Why is the sky blue?", "human_ref_A": "Rayleigh scattering.", "human_ref_B": "Magic."}
    records = [{**question, "labels": 1, "score_A": 10, "score_B": 2},
               {**question, "labels": 0, "score_A": 3, "score_B": 9},     # B preferred
               {**question, "labels": 1, "score_A": 5, "score_B": 3},     # 5/3 < 2: a weak preference
               {**question, "labels": 1}]                                  # without scores: no filter
    format_name, outcomes = data.records_to_pairs(records)
    prompt = "\n\nHuman: Why is the sky blue?\n\nAssistant:"
    assert format_name == "Stanford SHP"
    assert outcomes == [{"prompt": prompt, "chosen": " Rayleigh scattering.", "rejected": " Magic."},
                        {"prompt": prompt, "chosen": " Magic.", "rejected": " Rayleigh scattering."},
                        "score ratio below 2",
                        {"prompt": prompt, "chosen": " Rayleigh scattering.", "rejected": " Magic."}]
    with pytest.raises(UserError, match="record 1: field 'labels' is 2; Stanford SHP uses 1"):
        data.records_to_pairs([{**question, "labels": 2}])


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
            data.main(["--inspect", "--data", str(path)])
        message = str(exit_info.value.code)
        assert message.startswith(f"error: {tmp_path}/") and expected in message and "\n" not in message
    # datasets logs read errors itself; the loader silences that, so the one line is all a user sees
    assert capfd.readouterr().err == ""


def test_inspect_shows_the_format_and_the_rendered_first_pair(tmp_path, capsys):
    conversations = [{"chosen": CONTEXT + [assistant(f"Ten minutes, {i}.")], "rejected": CONTEXT + [assistant("No.")]}
                     for i in range(20)]
    path = write_jsonl(tmp_path / "chat.jsonl", conversations)
    data.main(["--inspect", "--data", str(path), "--max_len", "64"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (f"data: {path} [train]: kept 19 pairs, dropped 0 (none); format: conversational; "
                        "every 20th record held out for test")
    assert lines[2:6] == ["first pair as text, split where training splits it:",
                          f"prompt:    {HH_PROMPT!r}",
                          f"chosen:    {' Ten minutes, 0.'!r}",
                          f"rejected:  {' No.'!r}"]
