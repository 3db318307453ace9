"""sample.py's files and bookkeeping: LABEL=MODEL, prompt files, means with standard errors, the summary
table, and NAME.md / NAME.json / NAME.jsonl written whole (strict JSON: no NaN or Infinity)."""
import json
import math
import os

import numpy as np

from machinery import UserError
from machinery.checkpoints import atomic_write


def labelled(spec):
    """"LABEL=MODEL" -> (LABEL, MODEL); a bare MODEL is labelled by its last path component."""
    if "=" in spec:
        label, path = spec.split("=", 1)
        return label, path
    return os.path.basename(os.path.normpath(spec)), spec


def read_prompts_file(path):
    """The prompts of a text file, separated by lines that are exactly ---."""
    try:
        with open(path, encoding="utf-8") as f:
            return [block.strip("\n") for block in f.read().split("\n---\n") if block.strip()]
    except OSError as e:
        raise UserError(f"cannot read --prompts_file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"--prompts_file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None


def mean_and_sem(values):
    """Mean and standard error of the mean (sample std, ddof 1, over sqrt(n)): how far the mean could move
    with other samples. The error is nan for one value: no estimate, rather than a fake zero."""
    values = np.asarray(values, dtype=float)
    error = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
    return float(values.mean()), float(error)


def mean_and_error(name, values):
    """{name: mean, name_se: its standard error}, for the summary tables."""
    mean, error = mean_and_sem(values)
    return {name: mean, name + "_se": error}


def table(summary):
    """The summary {label: {column: value}} as a markdown table; a mean with a standard error shows as
    "mean +- error"."""
    columns = [c for c in ("mean_length", "kl", "oracle_reward", "accuracy") if any(c in row for row in summary.values())]
    rows = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, row in summary.items():
        cells = []
        for c in columns:
            cell = f"{row[c]:.3f}" if c in row else ""
            if row.get(c + "_se") is not None and math.isfinite(row[c + "_se"]):
                cell += f" +- {row[c + '_se']:.3f}"
            cells.append(cell)
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def check_writable(results_dir, name):
    """Fail before sampling, not after, if the results cannot be written."""
    try:
        os.makedirs(results_dir, exist_ok=True)
        for extension in (".md", ".json", ".jsonl"):
            path = os.path.join(results_dir, name + extension)
            if os.path.isdir(path):
                raise IsADirectoryError(21, "a directory is in the way", path)
            with open(path + ".probe", "w"):
                pass
            os.remove(path + ".probe")
    except OSError as e:
        raise UserError(f"cannot write {os.path.join(results_dir, name)}.md ({e.strerror}); give "
                        "another --results_dir or --name") from None


def strict(value):
    """value with every float that is not finite (nan, inf) replaced by None: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def write_results(results_dir, name, command, record, markdown):
    """NAME.json (record: settings, summary, every sample), NAME.jsonl (a sample a line) and NAME.md,
    each written whole or not at all."""
    samples = record["samples"]
    texts = {".json": json.dumps(strict(record), indent=1, allow_nan=False),
             ".jsonl": "".join(json.dumps(strict({"model": label, **row}), allow_nan=False) + "\n"
                               for label, rows in samples.items() for row in rows),
             ".md": "\n".join([f"# {name}", "", f"`{command}`", ""] + markdown)}
    for extension, text in texts.items():
        atomic_write(os.path.join(results_dir, name + extension), lambda path: _write_text(path, text))


def _write_text(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
