"""Where preference pairs come from, and every record format: the machinery under data.load_preferences.

Sources: a hub dataset by name (`NAME`, or one of its data directories as `NAME:DIR`, e.g.
`Anthropic/hh-rlhf:helpful-base`); one local file (.jsonl, .json, .parquet, .csv, or .gz of the text
ones); or a directory of split files, named by split (`train.jsonl`, `test.parquet`, ...) or in the hub's
layout (`data/train-00000-of-00001.parquet`). A source with a single split (one file, a directory of one
split file, a hub dataset with one split) holds out every 20th record as the test split.

Formats, detected from the fields of each record (one format per source):

    prompt/chosen/rejected text   {"prompt": "...", "chosen": "...", "rejected": "..."}, taken as they are
    HH dialogues                  {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}: split after
                                  the last "\\n\\nAssistant:" (Anthropic's HH-RLHF; data.split_hh, the lesson's)
    shared-start text             {"chosen": "...", "rejected": "..."} without HH markers: the prompt is the
                                  longest run of whole words both texts start with
    conversational                {"chosen": [{"role": "user", "content": ...}, ...], "rejected": [...]}, with
                                  an optional "prompt" (messages, or text as one user message): rendered as
                                  HH text (render_hh), the last assistant message being the response
    Stanford SHP                  {"history", "human_ref_A", "human_ref_B", "labels", "score_A", "score_B"}:
                                  the labelled-preferred reply is chosen; pairs whose scores differ by less
                                  than a factor of 2 are dropped, as in the DPO authors' reference
                                  implementation (github.com/eric-mitchell/direct-preference-optimization)
"""
import collections
import contextlib
import gzip
import json
import os
import zlib

from typing import Callable, NamedTuple

from machinery import UserError

class Dialogue(NamedTuple):
    """How HH writes a conversation, and where its prompt ends: the lesson's data.HH (HUMAN, ASSISTANT,
    split_hh), passed in, so that this module needs nothing back from data.py."""
    human: str
    assistant: str
    split: Callable


SHIPPED = "examples/hh-rlhf-harmless-base"  # HH-RLHF's excerpt in this repository, for a machine with no network
HELD_OUT_EVERY = 20   # a source with one split only: every 20th record is the test split (5%)
FILE_TYPES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".csv", ".csv.gz", ".parquet")  # parquet compresses itself
SHP_FIELDS = ("history", "human_ref_A", "human_ref_B", "labels")
SHP_MIN_SCORE_RATIO = 2


def read_pairs(source, split, hh, split_name=None, verbose=True):
    """Preference pairs of one split of a local or hub source as text; prints one line: pairs kept,
    dropped for which reason, the format, and which records were held out."""
    split_name = split_name or split
    if source == "toy":  # data.load_preferences answers for the toy task's own split names
        raise UserError(f"toy has no split {split_name!r}: its splits are train and test")
    numbered, single = read_records(source, split_name)
    records, locations = [record for _, record in numbered], [where for where, _ in numbered]
    format_name, outcomes = records_to_pairs(records, hh, locations)
    if single:
        outcomes = _hold_out(outcomes, split, source)
    pairs = [outcome for outcome in outcomes if isinstance(outcome, dict)]
    dropped = collections.Counter(outcome for outcome in outcomes if isinstance(outcome, str))
    if verbose:
        reasons = ", ".join(f"{n} {why}" for why, n in dropped.items()) or "none"
        hold_out = f"; {single}: every {HELD_OUT_EVERY}th record held out for test" if single else ""
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

def records_to_pairs(records, hh, locations=None):
    """Records of one source -> (format name, outcomes): outcome i is record i's {"prompt", "chosen",
    "rejected"} or, a string, the reason it was dropped; hh is data.HH. locations[i] names record i in errors (file and
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
        is_hh = any(hh.assistant in record["chosen"] for _, record in records)
        first_format = "HH dialogues" if is_hh else "shared-start text"
        split_record = _split_hh if is_hh else _split_shared_start
    outcomes = []
    for where, record in records:
        outcome = split_record(record, where, hh)
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


def _split_explicit(record, where, hh):
    return record["prompt"], record["chosen"], record["rejected"]


def _split_shared_start(record, where, hh):
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


def _split_messages(record, where, hh):
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
    return render_hh(context, hh), " " + chosen[-1]["content"], " " + rejected[-1]["content"]


def _turn(message):
    return message["role"], message["content"]


def render_hh(messages, hh):
    """Messages before a response, as the HH text our SFT teaches (GPT-2 has no chat template):
    "\\n\\nHuman: " + content for a user message, "\\n\\nAssistant: " + content for an assistant's, then the
    "\\n\\nAssistant:" the response follows (with its own leading space). A system message, allowed first
    only, is plain text before the first turn: HH has no system role, and a turn marker would put its
    words in someone's mouth."""
    marker = {"user": hh.human + " ", "assistant": hh.assistant + " ", "system": ""}
    return "".join(marker[m["role"]] + m["content"] for m in messages) + hh.assistant


def _split_shp(record, where, hh):
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
    return f"{hh.human} {record['history']}{hh.assistant}", " " + preferred, " " + other



def _split_hh(record, where, hh):
    """HH dialogues: the lesson's own split (data.split_hh)."""
    return hh.split(record["chosen"], record["rejected"])


# ----------------------------------------------------------------------------------------------------
# Finding and reading the records

def read_records(source, split_name):
    """([(where, record)], single) of one split of a source; `where` names the file and line, item or row
    for error messages, and single, when the source has one split only, says which (read_pairs then holds
    out every HELD_OUT_EVERY-th record as the test split)."""
    if os.path.isdir(source):
        return _read_directory(source, split_name)
    if os.path.isfile(source):
        if split_name not in ("train", "test"):
            raise UserError(f"{source} is one file, so it has no split {split_name!r}: its test split is every "
                            f"{HELD_OUT_EVERY}th record, its train split the rest")
        return _read_file(source), "one file"
    if source.endswith(FILE_TYPES + (".gz",)) or source.startswith((".", "/")):
        raise UserError(f"data file {source} does not exist")
    return _load_hub(source, split_name)


def _file_type(path):
    return next((file_type for file_type in FILE_TYPES if path.endswith(file_type)), None)


def _split_files(directory):
    """{split name: [paths]}: the hub's data/NAME-*.TYPE shards where data/ holds any (a hub snapshot's
    top level holds metadata, not splits), else the NAME.TYPE files of the directory itself."""
    hub_splits = _named_files(os.path.join(directory, "data"), shards=True)
    return hub_splits or _named_files(directory, shards=False)


def _named_files(folder, shards):
    splits = collections.defaultdict(list)
    if not os.path.isdir(folder):
        return splits
    for file_name in sorted(os.listdir(folder)):
        file_type = _file_type(file_name)
        if file_type is None or not os.path.isfile(os.path.join(folder, file_name)):
            continue
        name = file_name[:-len(file_type)]
        if shards:
            name = name.split("-")[0]  # train-00000-of-00002: split names have no "-" on the hub
        splits[name].append(os.path.join(folder, file_name))
    return splits


def _read_directory(directory, split_name):
    splits = _split_files(directory)
    for name, paths in splits.items():
        types = sorted({_file_type(path) for path in paths})
        if len(types) > 1:  # train.jsonl beside train.jsonl.gz: which one is the data?
            raise UserError(f"{directory}: split {name!r} is in {len(paths)} files of different types "
                            f"({', '.join(os.path.basename(p) for p in paths)}); keep one")
    if not splits:
        subdirectories = sorted(d for d in os.listdir(directory)
                                if os.path.isdir(os.path.join(directory, d)) and not d.startswith("."))
        inside = f"; its subdirectories: {', '.join(subdirectories)}" if subdirectories else ""
        raise UserError(f"{directory} holds no split files (train.jsonl, test.jsonl.gz, train.parquet, "
                        f"data/train-00000-of-00001.parquet, ...){inside}")
    if len(splits) == 1:  # a single split: read_pairs holds out every 20th record for test
        ((only, paths),) = splits.items()
        if split_name not in ("train", "test", only):
            raise UserError(f"{directory} has no split {split_name!r}: it holds only {only!r} "
                            f"({', '.join(os.path.basename(p) for p in paths)}); name its split, or leave the split "
                            f"names at train and test to hold out every {HELD_OUT_EVERY}th record of it")
        single = f"the only split of {directory} is {only!r}"
        return [record for path in paths for record in _read_file(path)], single
    if split_name not in splits:
        raise UserError(f"{directory} has no split {split_name!r}; its splits are {', '.join(sorted(splits))}")
    return [record for path in splits[split_name] for record in _read_file(path)], False


def _load_hub(source, split_name):
    """A hub dataset; NAME:DIR picks one data directory (e.g. Anthropic/hh-rlhf:helpful-base)."""
    import datasets
    name, _, data_dir = source.partition(":")
    try:
        names = datasets.get_dataset_split_names(name, data_dir=data_dir or None)
    except Exception as e:
        raise UserError(f"could not load {name} [{split_name}] from the Hugging Face hub ({type(e).__name__}): check "
                        "the network, or give a local directory of split files or a .jsonl, .json, .parquet or .csv "
                        f"file ({SHIPPED} holds 512 HH pairs); on a CPU, --demo runs the toy task") from None
    held_out = len(names) == 1  # a single split: read_pairs holds out every 20th record for test
    if held_out and split_name not in ("train", "test", names[0]):
        raise UserError(f"{source} has no split {split_name!r}: it has only {names[0]!r}")
    chosen_split = names[0] if held_out else split_name
    if chosen_split not in names:
        raise UserError(f"{source} has no split {split_name!r}; its splits are {', '.join(names)}")
    try:
        records = datasets.load_dataset(name, data_dir=data_dir or None, split=chosen_split).to_list()
    except Exception as e:
        raise UserError(f"could not load {name} [{chosen_split}] from the Hugging Face hub "
                        f"({_first_line_of_cause(e)}); check the network and the name") from None
    numbered = [(f"{source} [{chosen_split}] row {number}", record) for number, record in enumerate(records, start=1)]
    return numbered, held_out and f"the only split of {source} is {names[0]!r}"


def _read_file(path):
    """[(where, record)] of one file; `where` names the file and the line, item or row, for errors."""
    file_type = _file_type(path)
    if file_type is None:
        raise UserError(f"{path}: unknown file type; data files are {', '.join(FILE_TYPES)}")
    if file_type in (".parquet", ".csv", ".csv.gz"):
        records = _read_table(path, file_type)
    else:
        records = _read_json(path, file_type)
    if not records:
        raise UserError(f"{path} is empty; it should hold preference pairs")
    return records


def _read_json(path, file_type):
    """.jsonl: one JSON object a line. .json: a JSON list of objects, or one object a line (as Stanford
    SHP's .json files are)."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except EOFError:
        raise UserError(f"{path} ends before its gzip data does (truncated?); copy or download it again") from None
    except (OSError, zlib.error) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x}); save the file as UTF-8") from None
    if file_type in (".json", ".json.gz") and text.lstrip().startswith(("[", "{")):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            if text.lstrip().startswith("["):
                raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
            items = None  # several objects: one a line, read below
        if isinstance(items, dict):
            raise UserError(f"{path} holds one JSON object, not a list of records: put the pairs in a JSON list, "
                            "or one object a line (.jsonl)")
        if isinstance(items, list):
            return [(f"{path}: item {number}", item) for number, item in enumerate(items, start=1)]
    expected = "one JSON object a line"
    if file_type in (".json", ".json.gz"):
        expected += ", or one JSON list"
    records = []
    # "\n" only, as editors number lines: str.splitlines would also break at a U+2028 inside a JSON string
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"{path}:{line_no}", json.loads(line)))
        except json.JSONDecodeError as e:
            if _is_json(text):  # valid JSON, but spread over lines (pretty-printed)
                raise UserError(f"{path} holds one JSON value over several lines; the file must hold {expected} "
                                "(.jsonl: write each object on one line)") from None
            raise UserError(f"{path}:{line_no}: not valid JSON ({e.msg}); the file must hold {expected}") from None
    return records


def _is_json(text):
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


def _read_table(path, file_type):
    """Rows of a .parquet or .csv(.gz) file, read by the datasets library."""
    builder = "parquet" if file_type == ".parquet" else "csv"
    # an empty csv cell is an empty string (an empty prompt is a valid prompt), not a missing value
    options = {} if builder == "parquet" else {"keep_default_na": False}
    with _quiet_datasets() as datasets:
        try:
            records = datasets.load_dataset(builder, data_files=path, split="train", **options).to_list()
        except Exception as e:
            raise UserError(f"{path}: not a readable {builder} file ({_first_line_of_cause(e)})") from None
    return [(f"{path}: row {number}", record) for number, record in enumerate(records, start=1)]


@contextlib.contextmanager
def _quiet_datasets():
    """datasets draws progress bars and logs read errors on stderr; for a local file our one summary
    line and one-line errors say it instead."""
    import datasets
    verbosity, bars_were_off = datasets.logging.get_verbosity(), datasets.are_progress_bars_disabled()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not bars_were_off:
            datasets.enable_progress_bars()


def _first_line_of_cause(error):
    """The innermost error's name and first line: datasets wraps the parser's own message in its own."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    first_line = str(error).strip().split("\n")[0]
    return f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__
