"""Run plumbing shared by sft.py and dpo.py: flags, where and in which precision to compute, the
optimizer's groups, checkpoints, the log, and stopping cleanly. None of it is the lesson; it is what
lets a run be left alone overnight. The training loops themselves stay in sft.py and dpo.py.
"""
import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import sys
from dataclasses import asdict, dataclass

import torch


class UserError(Exception):
    """A mistake the user can fix (a bad path, a bad flag). Scripts print it as one line, no traceback."""


@contextlib.contextmanager
def user_errors():
    """Turn a UserError into `error: ...` on stderr and exit status 1, instead of a traceback."""
    try:
        yield
    except UserError as e:
        sys.exit(f"error: {e}")


# ----------------------------------------------------------------------------------------------------
# Flags

class HelpFormatter(argparse.HelpFormatter):
    """--help shows each flag's default once: argparse's value, or the help text's own "(default: ...)"
    where the default is computed (None to argparse)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is not None and action.default is not argparse.SUPPRESS and "(default" not in text:
            text += " (default: %(default)s)"
        return text


def training_arguments(description, defaults, demo, out_dir_default=None):
    """The flags sft.py and dpo.py share; each script adds its own, then calls parse_training_arguments.
    out_dir_default: the help text's words for a default computed later (None to argparse)."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    shown = ", ".join(f"--{k} {v}" for k, v in demo.items())
    p.add_argument("--demo", action="store_true", help=f"the offline toy task on a tiny model, sized for a "
                   f"CPU: sets {shown} (flags given on the command line still win)")
    p.add_argument("--init", help="gpt2[-medium|-large|-xl], a Hugging Face directory, a checkpoint "
                   "directory, or scratch (with --n_layer/--n_head/--n_embd)")
    p.add_argument("--data", help="a hub dataset (NAME or NAME:DIR, e.g. Anthropic/hh-rlhf:helpful-base), a "
                   "directory of split files, a .jsonl/.json/.parquet/.csv file, or toy")
    p.add_argument("--train_split", default="train", help="the training split's name in --data, e.g. train_prefs")
    p.add_argument("--test_split", default="test", help="the held-out split's name in --data, e.g. test_prefs")
    p.add_argument("--out_dir", help="where the checkpoint and log.jsonl go" +
                   (f" (default: {out_dir_default})" if out_dir_default else ""))
    p.add_argument("--device", default="auto", help="auto (cuda if there is one, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPUs that have it, else fp16; fp32 on CPU), "
                   "float32, bfloat16, float16")
    p.add_argument("--batch_size", type=int, help="micro-batch, in examples (pairs for DPO)")
    p.add_argument("--grad_accum", type=int, help="micro-batches per optimizer step")
    p.add_argument("--max_len", type=int, help="tokens of prompt + response, at most")
    p.add_argument("--max_prompt_len", type=int, help="tokens a too-long prompt is cut to, its end kept "
                   "(default: max_len / 2)")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--warmup", type=int, help="optimizer steps of linear warmup")
    p.add_argument("--max_iters", type=int, help="optimizer steps in the whole run (a resumed run included)")
    p.add_argument("--weight_decay", type=float, default=0.0, help="AdamW's decoupled weight decay, on matrices")
    p.add_argument("--grad_clip", type=float, default=1.0, help="clip the gradient norm to this (0: off)")
    p.add_argument("--eval_interval", type=int, help="evaluate and save every N steps (0: only at the end)")
    p.add_argument("--eval_batches", type=int, default=20, help="micro-batches of the test split per eval")
    p.add_argument("--seed", type=int, default=1337, help="weights of a scratch model, data order, dropout")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (needs a C compiler on a CPU)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT_DIR from its ckpt.pt")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout probability while training")
    p.add_argument("--n_layer", type=int, default=2, help="with --init scratch")
    p.add_argument("--n_head", type=int, default=4, help="with --init scratch")
    p.add_argument("--n_embd", type=int, default=64, help="with --init scratch")
    p.set_defaults(**defaults)
    return p


def parse_training_arguments(parser, demo, argv=None):
    """Parse argv; with --demo, the demo's values replace the defaults first. Checks what a flag alone
    can get wrong, so a bad value stops the run before anything is loaded or written."""
    first = argparse.ArgumentParser(add_help=False)  # one look for --demo: it decides the defaults
    first.add_argument("--demo", action="store_true")
    if first.parse_known_args(argv)[0].demo:
        parser.set_defaults(**demo)
    args = parser.parse_args(argv)
    args.max_prompt_len = args.max_prompt_len or args.max_len // 2
    for name in ("batch_size", "grad_accum", "max_len", "max_prompt_len", "max_iters", "eval_batches"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.lr <= 0 or args.warmup < 0 or args.eval_interval < 0:
        parser.error("--lr must be positive, --warmup and --eval_interval not negative")
    if args.init == "scratch" and args.n_embd % args.n_head:
        parser.error(f"--n_embd {args.n_embd} must be a multiple of --n_head {args.n_head}")
    if args.compile and not torch.cuda.is_available() and not shutil.which(os.environ.get("CC", "cc")):
        parser.error("--compile on a CPU needs a C compiler (torch.compile writes C++ kernels): install gcc "
                     "or drop --compile")
    return args


def scratch_shape(args):
    """The GPTConfig fields of an --init scratch model."""
    return dict(block_size=args.max_len, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)


# ----------------------------------------------------------------------------------------------------
# Where and in which precision to compute

@dataclass
class Compute:
    """What a training step needs to know about the hardware."""
    device: str                      # "cpu", "cuda", "cuda:1"
    dtype: str                       # "float32", "bfloat16" or "float16": the precision of the matmuls
    autocast: object                 # the context the forward passes run in
    scaler: torch.amp.GradScaler     # loss scaling, enabled for float16 only


def compute_init(args):
    """Device, precision, autocast and GradScaler for a run; args.device and args.dtype become the
    resolved choices (so the checkpoint records what was used, not "auto")."""
    args.device = pick_device(args.device)
    args.dtype = pick_dtype(args.dtype, args.device)
    device_type = args.device.split(":")[0]
    if device_type == "cuda":
        # TF32 matmuls on Ampere and newer: ~8x the fp32 throughput, a 10-bit mantissa, harmless for training
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.dtype == "float32":
        autocast = contextlib.nullcontext()
    else:  # mixed precision: matmuls in bf16/fp16, weights and optimizer state stay fp32
        autocast = torch.autocast(device_type=device_type, dtype=getattr(torch, args.dtype))
    # fp16 overflows without loss scaling; bf16 has fp32's exponent range and needs none
    scaler = torch.amp.GradScaler(device_type, enabled=args.dtype == "float16")
    return Compute(args.device, args.dtype, autocast, scaler)


def pick_device(device):
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for, but this machine has no CUDA GPU; use --device cpu")
    return device


def pick_dtype(dtype, device):
    """Training precision: bf16 where the GPU supports it, else fp16 (with a GradScaler); fp32 on CPU."""
    if dtype == "auto":
        if not device.startswith("cuda"):
            return "float32"
        # emulated bf16 (pre-Ampere GPUs) is slow: those get fp16 and a GradScaler
        return "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--dtype {dtype} is not one of auto, float32, bfloat16, float16")
    return dtype


def make_optimizer(model, lr, weight_decay, device, kind="adamw", betas=(0.9, 0.95)):
    """AdamW (or RMSprop) with weight decay on matrices only: biases, LayerNorms stay undecayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if kind == "rmsprop":  # what the DPO paper used
        return torch.optim.RMSprop(groups, lr=lr)
    fused = device.startswith("cuda")  # one kernel for all parameters instead of several per tensor
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


# ----------------------------------------------------------------------------------------------------
# Checkpoints

def atomic_write(path, write):
    """write(tmp_path), then rename over path: a crash midway leaves the old file whole."""
    tmp = path + ".tmp"
    try:
        write(tmp)
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(out_dir, model, optimizer, scaler, iteration, args):
    """OUT_DIR/ckpt.pt of plain types only, so torch.load(..., weights_only=True) reads it. Scripts
    compile in place (model.compile()), so the state_dict keys are the plain model's."""
    checkpoint = {
        "model": model.state_dict(),
        "config": asdict(model.config),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "iter": iteration,
        "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
        "rng": {"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }
    os.makedirs(out_dir, exist_ok=True)
    atomic_write(os.path.join(out_dir, "ckpt.pt"), lambda path: torch.save(checkpoint, path))


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"no checkpoint at {path}") from None
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None


def resume(out_dir, model, optimizer, scaler):
    """Load OUT_DIR/ckpt.pt into model, optimizer and scaler, restore the RNGs; the step to go on from."""
    path = os.path.join(out_dir, "ckpt.pt")
    checkpoint = load_checkpoint(path)
    model.load_weights(checkpoint["model"], where=path)
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (ValueError, KeyError) as e:
        raise UserError(f"the optimizer state in {path} does not fit this run's optimizer ({e}); resume "
                        "with the flags of the run that wrote it") from None
    if checkpoint["scaler"] is not None:
        scaler.load_state_dict(checkpoint["scaler"])
    torch.set_rng_state(checkpoint["rng"]["cpu"])  # dropout masks continue as in a straight run
    if torch.cuda.is_available() and checkpoint["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
    print(f"resuming from step {checkpoint['iter']}")
    return checkpoint["iter"]


def stop_on_non_finite(loss, step, args):
    """A NaN or infinite loss ends the run before the optimizer step, so no checkpoint holds it."""
    if not math.isfinite(loss):
        raise UserError(f"loss is {loss} at step {step}; stopped, the last good checkpoint in {args.out_dir} is "
                        "kept. Try a lower --lr or --dtype bfloat16")


# ----------------------------------------------------------------------------------------------------
# The log, and stopping

class RunLog:
    """One JSON object a line in OUT_DIR/log.jsonl, and a console line. A run resumed from step
    `start` keeps the records up to that step: those after it (logged before a crash, but not in the
    checkpoint) are about to be done again."""

    def __init__(self, out_dir, start=0):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "log.jsonl")
        kept = []
        if start and os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if json.loads(line)["iter"] <= start]
        with open(self.path, "w") as f:
            f.writelines(kept)

    def __call__(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        shown = " | ".join(f"{k} {_short(v)}" for k, v in record.items() if k not in ("iter", "split"))
        print(f"{record['split']:5s} step {record['iter']:5d} | {shown}", flush=True)


def _short(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class CtrlC:
    """Ctrl-C sets a flag instead of killing the run, so the loop can save a checkpoint and stop."""

    def __enter__(self):
        self.pressed = False
        self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        print("\nCtrl-C: finishing this step, saving a checkpoint, then stopping", flush=True)
        self.pressed = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)
