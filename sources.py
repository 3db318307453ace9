"""Where preference records come from: hub datasets, local files and directories of split files.

data.load_preferences asks read_records for one split's raw records (dicts, one per line, item or row)
and turns them into prompt/chosen/rejected pairs. This module only finds and reads them, with errors
that name the file and the line: .jsonl, .json, .parquet, .csv and the .gz of the text ones, through
the `datasets` library where it already reads the format (parquet, csv, and the hub).
"""
import collections
import contextlib
import gzip
import json
import os
import zlib

from runs import UserError

HELD_OUT_EVERY = 20   # a source with one split only: every 20th record is the test split (5%)
FILE_TYPES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".csv", ".csv.gz", ".parquet")  # parquet compresses itself


def read_records(source, split_name):
    """([(where, record)], held_out) of one split of a source; `where` names the file and line, item
    or row for error messages, and held_out says the source has a single split only (load_preferences
    then holds out every HELD_OUT_EVERY-th record as the test split)."""
    if os.path.isdir(source):
        return _read_directory(source, split_name)
    if os.path.isfile(source):
        if split_name not in ("train", "test"):
            raise UserError(f"{source} is one file, so it has no split {split_name!r}: its test split is every "
                            f"{HELD_OUT_EVERY}th record, its train split the rest")
        return _read_file(source), True
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
    if len(splits) == 1:  # a single split: load_preferences holds out every 20th record for test
        (paths,) = splits.values()
        return [record for path in paths for record in _read_file(path)], True
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
        raise UserError(f"could not load {name} [{split_name}] from the Hugging Face hub ({type(e).__name__}); "
                        "check the network, or give a local directory of split files or a .jsonl, .json, "
                        ".parquet or .csv file") from None
    held_out = len(names) == 1  # a single split: load_preferences holds out every 20th record for test
    chosen_split = names[0] if held_out else split_name
    if chosen_split not in names:
        raise UserError(f"{source} has no split {split_name!r}; its splits are {', '.join(names)}")
    try:
        records = datasets.load_dataset(name, data_dir=data_dir or None, split=chosen_split).to_list()
    except Exception as e:
        raise UserError(f"could not load {name} [{chosen_split}] from the Hugging Face hub "
                        f"({_first_line_of_cause(e)}); check the network and the name") from None
    numbered = [(f"{source} [{chosen_split}] row {number}", record) for number, record in enumerate(records, start=1)]
    return numbered, held_out


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
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except EOFError:
        raise UserError(f"{path} ends before its gzip data does (truncated?); copy or download it again") from None
    except (OSError, UnicodeDecodeError, zlib.error) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if file_type in (".json", ".json.gz") and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
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
            raise UserError(f"{path}:{line_no}: not valid JSON ({e.msg}); the file must hold {expected}") from None
    return records


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
