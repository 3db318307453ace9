"""sample.py's files and bookkeeping: LABEL=MODEL, prompt files, means with standard errors, the summary
table, and NAME.md / NAME.json / NAME.jsonl written whole (strict JSON: no NaN or Infinity)."""
import glob
import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch

from data import EOS, tokenize_pairs
from machinery import UserError
from machinery.files import try_writing, write_text
from machinery.cli import at_least
from machinery.compute import pick_device

DEMO_DIR = "out/demo"


def labelled(spec):
    """"LABEL=MODEL" -> (LABEL, MODEL); a bare MODEL is labelled by its last path component."""
    if "=" in spec:
        label, path = spec.split("=", 1)
        return label, path
    return os.path.basename(os.path.normpath(spec)), spec


def demo_models():
    """Every run in out/demo that saved a checkpoint, as LABEL=DIR: the reference (sft) first, then dpo and
    dpo-bad, then the rest by name (the reruns with one flag changed: dpo-beta0.5, ...)."""
    found = sorted(os.path.basename(os.path.dirname(path)) for path in glob.glob(os.path.join(DEMO_DIR, "*", "ckpt.pt")))
    first = [name for name in ("sft", "dpo", "dpo-bad") if name in found]
    return [f"{name}={os.path.join(DEMO_DIR, name)}" for name in first + [n for n in found if n not in first]]


def add_io_flags(p):
    """sample.py's flags for how many prompts and tokens, the held-out split's name, where prompts come from, where
    it runs, and where its results go."""
    p.add_argument("--num_prompts", type=at_least(1), help="prompts taken from --data (default: 8; 64 with --demo)")
    p.add_argument("--max_new_tokens", type=at_least(1), help="tokens a sample, at most (default: 128; 40 with --demo)")
    p.add_argument("--test_split", default="test", help="the held-out split's name in --data")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for more (default: none)")
    p.add_argument("--prompts_file", help="prompts separated by lines that are exactly --- (default: none)")
    p.add_argument("--device", default="auto", help="auto (cuda if there is one, else cpu), cpu, cuda, ...")
    p.add_argument("--results_dir", help="where NAME.md, .json, .jsonl go (default: out/samples; out/demo with --demo)")
    p.add_argument("--name", help="the results' file name (default: samples)")
    p.add_argument("--show", type=at_least(0), default=3, help="prompts printed side by side on the console")


def checked(parser, args):
    """sample.py's flags, completed (the demo's defaults) and checked in one line each."""
    if args.demo:
        args.model = args.model or demo_models()
        if not args.model:
            parser.error(f"no runs in {DEMO_DIR}: run the demo's training commands first (README, the demo)")
        args.data = args.data or "toy"
        args.num_prompts = 64 if args.num_prompts is None else args.num_prompts
        args.max_new_tokens = 40 if args.max_new_tokens is None else args.max_new_tokens
        args.device = "cpu" if args.device == "auto" else args.device
    args.num_prompts = 8 if args.num_prompts is None else args.num_prompts
    args.max_new_tokens = 128 if args.max_new_tokens is None else args.max_new_tokens
    args.results_dir = args.results_dir or (DEMO_DIR if args.demo else "out/samples")
    args.name = args.name or "samples"
    if args.top_p == 0:
        parser.error("argument --top_p: must be in (0, 1], got 0")
    if not args.model:
        parser.error("give at least one --model (or --demo)")
    args.models = [labelled(spec) for spec in args.model]  # [(label, path)]
    labels = [label for label, _ in args.models]
    if len(set(labels)) < len(labels):
        parser.error(f"two models share a label ({', '.join(labels)}); name them as LABEL=MODEL")
    args.ref = args.ref or labels[0]
    try:
        args.device = pick_device(args.device)
    except UserError as e:
        parser.error(str(e))
    return args


def prompts(args, held_out, tokenizer, models):
    """(texts, token ids) of the prompts to sample: --prompt and --prompts_file, else the first --num_prompts
    of --data's test split; a prompt too long for the context keeps its end (what the reply answers)."""
    texts = list(args.prompt) + (read_prompts_file(args.prompts_file) if args.prompts_file else [])
    if not texts and held_out:
        texts = [pair["prompt"] for pair in held_out[:args.num_prompts]]
    if not texts:
        raise UserError("no prompts: give --prompt, --prompts_file or --data")
    context = min(m.config.block_size for m in models)
    if args.max_new_tokens >= context:
        raise UserError(f"--max_new_tokens {args.max_new_tokens} leaves no room for a prompt in a context of "
                        f"{context} tokens (the models' block_size); use at most {context // 2} or so")
    encoded = [tokenizer.encode_ordinary(text) or [EOS] for text in texts]  # EOS: an empty prompt
    room = context - args.max_new_tokens
    cropped = sum(len(ids) > room for ids in encoded)
    if cropped:
        print(f"note: {cropped} of {len(texts)} prompts are longer than the {room} tokens that "
              f"--max_new_tokens {args.max_new_tokens} leaves of {context}: each keeps its last {room}")
    return texts, [ids[-room:] for ids in encoded]


def accuracy_pairs(held_out, tokenizer, context):
    """The first 256 held-out pairs as token ids, for held-out accuracy; pairs longer than the models' context
    (a toy model's is short) are left out."""
    pairs = tokenize_pairs(held_out[:256], 512, 256, tokenizer, verbose=False) if held_out else []
    return [p for p in pairs if len(p["prompt"]) + max(len(p["chosen"]), len(p["rejected"])) <= context]


def machine():
    """Where a result was made: the same run repeats exactly on one machine, but another CPU, thread count or
    torch version rounds differently, and training amplifies that (README, section 2)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"torch": torch.__version__, "cpu": cpu, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


def write(args, argv, prompts, samples, summary):
    """The three results files: the command that made them, the table, then every prompt's completions."""
    settings = {k: getattr(args, k) for k in ("model", "data", "temperature", "top_k", "top_p", "max_new_tokens",
                                               "seed")}
    markdown = [f"Temperature {args.temperature}, {len(prompts)} prompts, seed {args.seed}; KL and accuracy "
                f"against `{args.ref}`; ± is one standard error over the samples.", "", table(summary), ""]
    for i, prompt in enumerate(prompts):
        markdown += [f"## Prompt {i + 1}", "", "```", prompt.strip(), "```", ""]
        markdown += [f"- **{label}**: {rows[i]['completion'].strip()!r}" for label, rows in samples.items()] + [""]
    command = " ".join(["python sample.py"] + (sys.argv[1:] if argv is None else list(argv)))
    write_results(args.results_dir, args.name, command, {"settings": settings, "reference": args.ref,
                                                          "machine": machine(), "summary": summary,
                                                          "samples": samples}, markdown)


def show(args, prompts, samples, summary):
    for i in range(min(args.show, len(prompts))):
        print(f"\n=== prompt {i + 1}: {prompts[i].strip()[-120:]!r}")
        for label, rows in samples.items():
            print(f"--- {label}: {rows[i]['completion'].strip()!r}")
    print("\n" + table(summary))
    print(f"\nwrote {os.path.join(args.results_dir, args.name)}.md, .json and .jsonl")


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


# the summary's columns, as the README's tables show them: (key, title, decimals)
COLUMNS = (("oracle_reward", "oracle reward", 3), ("kl", "KL from the reference (nats)", 2),
           ("mean_length", "mean length (tokens)", 1), ("accuracy", "held-out accuracy", 3))


def cell(row, key, decimals):
    """One summary value as a table shows it: "mean ± its standard error" where there is one."""
    if key not in row:
        return ""
    error = row.get(key + "_se")
    shown = f"{row[key]:.{decimals}f}"
    return shown + (f" ± {error:.{decimals}f}" if error is not None and math.isfinite(error) and error else "")


def table(summary):
    """The summary {label: {column: value}} as a markdown table, the README's layout: oracle reward, KL, mean
    length, held-out accuracy, each mean with its standard error over the samples."""
    columns = [column for column in COLUMNS if any(column[0] in row for row in summary.values())]
    rows = ["| model | " + " | ".join(title for _, title, _ in columns) + " |", "|---|" + "---:|" * len(columns)]
    for label, row in summary.items():
        rows.append(f"| {label} | " + " | ".join(cell(row, key, decimals) for key, _, decimals in columns) + " |")
    return "\n".join(rows)


def check_writable(results_dir, name):
    """Fail before sampling, not after, if the results cannot be written; a folder made for them is removed
    again."""
    made = not os.path.isdir(results_dir)
    try:
        os.makedirs(results_dir, exist_ok=True)
        for extension in (".md", ".json", ".jsonl"):
            path = os.path.join(results_dir, name + extension)
            if os.path.isdir(path):
                raise IsADirectoryError(21, "a directory is in the way", path)
            try_writing(path)
    except OSError as e:
        if made and os.path.isdir(results_dir) and not os.listdir(results_dir):
            os.rmdir(results_dir)
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
        try:
            write_text(os.path.join(results_dir, name + extension), text)
        except OSError as e:  # a disk that filled while sampling: each file is whole, or as it was
            raise UserError(f"cannot write {os.path.join(results_dir, name + extension)} ({e.strerror}); the "
                            "files written before it are whole, this one is as it was") from None
