"""Flags and one-line errors: the command line the training scripts share, the checks a flag alone can
fail, and what a user mistake looks like (one line, exit status 2 for a bad flag, 1 for the rest)."""
import argparse
import contextlib
import math
import os
import shlex
import shutil
import sys

import torch

from machinery import UserError
from machinery.compute import pick_device


class Interrupted(Exception):
    """Ctrl-C or SIGTERM before the training loop started (run.StopSignals handles them inside it)."""


def speaks():
    """Under torchrun every process stops on an error; process 0 alone says why."""
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def user_errors():
    """A UserError becomes `error: ...` on stderr and exit status 1, an interruption before training
    one line too: never a traceback for what the user did."""
    try:
        yield
    except UserError as e:
        sys.exit(f"error: {e}" if speaks() else 1)
    except (KeyboardInterrupt, Interrupted) as e:
        name = str(e) or "Ctrl-C"
        sys.exit(f"{name} before training started: stopped, no checkpoint was written" if speaks() else 1)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage mistake in one line (argparse prints the whole usage first), once under torchrun."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n" if speaks() else None)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help shows each flag's default once: argparse's value, or the help text's own "(default: ...)"
    where the default is computed (None to argparse)."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = action.default is not None and action.default != [] and action.default is not argparse.SUPPRESS
        if shown and "(default" not in text:
            text += " (default: %(default)s)"
        return text


def description(doc):
    """A script's --help description: its docstring's first paragraph, whole."""
    return " ".join(doc.strip().split("\n\n")[0].split())


# ----------------------------------------------------------------------------------------------------
# Checked numbers: argparse calls these on the text of a flag and prints the message in one line

def _number(text, kind):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a {'whole ' if kind is int else ''}number, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def at_least(minimum):
    """A whole number >= minimum."""
    def parse(text):
        value = _number(text, int)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def positive(text):
    """A finite number > 0."""
    value = _number(text, float)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def not_negative(text):
    """A finite number >= 0."""
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


def fraction(low, high, high_included=False):
    """A number in [low, high), or [low, high] with high_included."""
    def parse(text):
        value = _number(text, float)
        if not (low <= value < high or high_included and value == high):
            raise argparse.ArgumentTypeError(f"must be in [{low:g}, {high:g}{']' if high_included else ')'}, got {text}")
        return value
    return parse


# ----------------------------------------------------------------------------------------------------
# The flags sft.py and dpo.py share

# The shared flags that define an experiment: --resume refuses when one differs from the checkpoint's.
# Each script adds its own. The others may change on resume: --max_iters (upward), --eval_interval,
# --eval_batches (what is measured, and when), --device, --dtype, --compile, --grad_checkpoint, --chunked_head,
# --dist_timeout (where, how fast and in how much memory, not what is trained).
EXPERIMENT = ("init", "data", "train_split", "test_split", "batch_size", "grad_accum", "max_len", "max_prompt_len",
              "seed", "lr", "warmup", "weight_decay", "grad_clip", "dropout", "n_layer", "n_head", "n_embd")
SCRATCH_ONLY = ("n_layer", "n_head", "n_embd")  # they shape the model only with --init scratch
# what a demo run's name leaves out: flags that change where and how fast, not which model comes out
NOT_IN_A_NAME = ("demo", "out_dir", "device", "dtype", "compile", "grad_checkpoint", "chunked_head", "resume", "overwrite",
                 "eval_interval", "eval_batches", "dist_timeout", "next")


def training_parser(doc, defaults, demo):
    """The parser of a training script, with the shared flags; the script adds its own, then calls parse."""
    p = ArgumentParser(description=description(doc), formatter_class=HelpFormatter, epilog=doc.split("\n\n", 1)[-1])
    shown = ", ".join(f"--{k} {v}" for k, v in demo.items())
    p.add_argument("--demo", action="store_true", help=f"the offline toy task on a tiny model, sized for a "
                   f"CPU: sets {shown} (flags given on the command line still win)")
    p.add_argument("--init", help="gpt2[-medium|-large|-xl], a Hugging Face directory, a checkpoint "
                   "directory, or scratch (with --n_layer/--n_head/--n_embd)")
    p.add_argument("--data", help="a hub dataset (NAME or NAME:DIR, e.g. Anthropic/hh-rlhf:helpful-base), a "
                   "directory of split files, a .jsonl/.json/.parquet/.csv file, or toy")
    p.add_argument("--train_split", default="train", help="the training split's name in --data, e.g. train_prefs")
    p.add_argument("--test_split", default="test", help="the held-out split's name in --data, e.g. test_prefs")
    p.add_argument("--out_dir", help="where the checkpoint and log.jsonl go (default: out/STAGE; with --demo "
                   "out/demo/STAGE, named by the flags that differ from the demo's)")
    p.add_argument("--device", default="auto", help="auto (cuda if there is one, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="auto: bf16 on GPUs that have it, else fp16; fp32 on a CPU")
    p.add_argument("--batch_size", type=at_least(1), help="micro-batch, in examples (pairs for DPO)")
    p.add_argument("--grad_accum", type=at_least(1), help="micro-batches per optimizer step, in all: under "
                   "torchrun each of N processes does grad_accum / N, so the effective batch is batch_size x "
                   "grad_accum for any N")
    p.add_argument("--max_len", type=at_least(2), help="tokens of prompt + response, at most")
    p.add_argument("--max_prompt_len", type=at_least(1), help="tokens a too-long prompt is cut to, its end kept "
                   "(default: max_len / 2)")
    p.add_argument("--lr", type=positive, help="peak learning rate")
    p.add_argument("--warmup", type=at_least(0), help="optimizer steps of linear warmup")
    p.add_argument("--max_iters", type=at_least(1), help="optimizer steps in the whole run (a resumed run included)")
    p.add_argument("--weight_decay", type=not_negative, default=0.0,
                   help="weight decay on matrices: decoupled under AdamW, an L2 term under RMSprop")
    p.add_argument("--grad_clip", type=not_negative, default=1.0, help="clip the gradient norm to this (0: off)")
    p.add_argument("--eval_interval", type=at_least(0), help="evaluate and save every N steps (0: only at the end)")
    p.add_argument("--eval_batches", type=at_least(1), default=20, help="micro-batches of the test split per eval")
    p.add_argument("--seed", type=int, default=1337, help="weights of a scratch model, data order, dropout")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (needs a C compiler on a CPU)")
    p.add_argument("--grad_checkpoint", action="store_true", help="recompute each block's activations in backward: "
                   "less memory for about a third more compute (same gradients)")
    p.add_argument("--chunked_head", action="store_true", help="the output layer's log-probs chunk by chunk, its "
                   "logits never whole: less memory, the same numbers (docs/performance.md)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT_DIR from its ckpt.pt, with "
                   "the same flags (only --max_iters upward, --eval_interval, --eval_batches, --device, --dtype, "
                   "--compile, --grad_checkpoint, --chunked_head and --dist_timeout may change)")
    p.add_argument("--overwrite", action="store_true", help="start a new run in an OUT_DIR that holds one; the "
                   "old run's ckpt.pt and log.jsonl are moved to OUT_DIR/replaced-TIME/ first")
    p.add_argument("--dropout", type=fraction(0, 1), default=0.0, help="dropout probability while training")
    p.add_argument("--n_layer", type=at_least(1), default=2, help="with --init scratch")
    p.add_argument("--n_head", type=at_least(1), default=4, help="with --init scratch")
    p.add_argument("--n_embd", type=at_least(1), default=64, help="with --init scratch")
    p.add_argument("--dist_timeout", type=positive, default=600, help="under torchrun: seconds a process waits "
                   "for the others at a collective before it stops the run, naming what it waited for")
    p.set_defaults(**defaults)
    return p


def parse(parser, demo, argv=None, stage=None):
    """Parse argv; with --demo, the demo's values replace the defaults first. Checks what flags alone can
    get wrong, so a bad value stops the run before anything is loaded or written."""
    first = argparse.ArgumentParser(add_help=False)  # one look for --demo: it decides the defaults
    first.add_argument("--demo", action="store_true")
    if first.parse_known_args(argv)[0].demo:
        parser.set_defaults(**demo)
    args = parser.parse_args(argv)
    if args.max_prompt_len is None:
        args.max_prompt_len = args.max_len // 2
    elif args.max_prompt_len >= args.max_len:
        parser.error(f"--max_prompt_len {args.max_prompt_len} must be below --max_len {args.max_len}")
    if args.init == "scratch" and args.n_embd % args.n_head:
        parser.error(f"--n_embd {args.n_embd} must be a multiple of --n_head {args.n_head}")
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in OUT_DIR, --overwrite replaces it: pass one")
    if args.compile and not torch.cuda.is_available() and not shutil.which(os.environ.get("CC", "cc")):
        parser.error("--compile on a CPU needs a C compiler (torch.compile writes C++ kernels): install gcc "
                     "or drop --compile")
    try:
        pick_device(args.device)
    except UserError as e:
        parser.error(str(e))
    if args.out_dir is None and stage is not None:
        args.out_dir = default_out_dir(parser, args, stage)
    return args


def default_out_dir(parser, args, stage, leave_out=()):
    """out/STAGE, or for a demo run out/demo/STAGE followed by each flag given that differs from the demo's
    (out/demo/dpo-beta0.5, out/demo/dpo-from-sft-max_iters600): a rerun with one knob turned keeps the
    earlier run beside it. leave_out: flags the stage's name already says (dpo.py's --swap: dpo-bad)."""
    if not args.demo:
        return f"out/{stage}"
    demo = vars(parser.parse_args(["--demo"]))  # the demo's own values
    name = [f"out/demo/{stage}"]
    for flag, value in sorted(vars(args).items()):
        if flag in NOT_IN_A_NAME or flag in leave_out or value == demo.get(flag, value) or value is None:
            continue
        if flag == "max_prompt_len" and value == args.max_len // 2:
            continue  # its default, which follows --max_len
        if flag in ("init", "ref", "data"):  # a path: its last part says enough
            name.append({"init": "from-", "ref": "ref-", "data": "data-"}[flag] + os.path.basename(os.path.normpath(value)))
        else:
            name.append(flag if value is True else f"{flag}{value}")
    return "-".join(name)


# the flags a next stage shares with this one (data, device, batch shape): next_command repeats them
CARRIED = ("data", "train_split", "test_split", "device", "dtype", "batch_size", "grad_accum", "max_len",
           "max_prompt_len", "eval_batches")


def sample_command(parser, args, reference, policy):
    """dpo.py's next command: sample.py on the policy beside its reference. `sample.py --demo` for a demo run in
    out/demo (it samples every run there); a reference from scratch was never saved, so only the policy."""
    if args.demo and reference == args.init and os.path.dirname(os.path.normpath(policy)) == "out/demo":
        return "python sample.py --demo"
    models = ([] if reference == "scratch" else [("--model", f"reference={reference}")]) + [("--model", f"dpo={policy}")]
    return next_command(parser, args, "sample.py", models, carry=("data", "device"))


def next_command(parser, args, script, extra, carry=None):
    """The command to run next, repeating this run's own flags where they carry over: each flag in carry
    (default: CARRIED, and outside the demo --max_iters and --eval_interval too, so that a short trial stays
    short) whose value differs from the default (the demo's with --demo), then extra, [(flag, value)]."""
    if carry is None:
        carry = CARRIED + (() if args.demo else ("max_iters", "eval_interval"))
    defaults = vars(parser.parse_args(["--demo"] if args.demo else []))
    words = [f"python {script}"] + (["--demo"] if args.demo else [])
    for flag in carry:
        value = getattr(args, flag)
        if flag == "max_prompt_len" and value == args.max_len // 2:
            continue  # its default, which follows --max_len
        if value != defaults.get(flag) and value is not None and value is not False:
            words.append(f"--{flag}" if value is True else f"--{flag} {shlex.quote(str(value))}")
    words += [f"{flag} {shlex.quote(str(value))}" for flag, value in extra]  # a path with a space stays one word
    return " ".join(words)

