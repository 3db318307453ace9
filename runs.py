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
import socket
import sys
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


class UserError(Exception):
    """A mistake the user can fix (a bad path, a bad flag). Scripts print it as one line, no traceback."""


@contextlib.contextmanager
def user_errors():
    """Turn a UserError into `error: ...` on stderr and exit status 1, instead of a traceback."""
    speaks = os.environ.get("RANK", "0") == "0"  # under torchrun every process stops, process 0 says why
    try:
        yield
    except UserError as e:
        sys.exit(f"error: {e}" if speaks else 1)
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which handles its own): no traceback
        sys.exit("interrupted; nothing was written" if speaks else 1)


# ----------------------------------------------------------------------------------------------------
# Flags

class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported in one line (argparse prints the whole usage first)."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


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
    p = ArgumentParser(description=description, formatter_class=HelpFormatter)
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
    p.add_argument("--grad_accum", type=int, help="micro-batches per optimizer step, in all: under torchrun each "
                   "of N processes does grad_accum / N, so the effective batch is batch_size x grad_accum for any N")
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
    p.add_argument("--grad_checkpoint", action="store_true", help="recompute each block's activations in backward: "
                   "less memory for about a third more compute (same gradients)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT_DIR from its ckpt.pt, with "
                   "the same flags (only --max_iters upward, --eval_interval, --eval_batches, --device, --dtype, "
                   "--compile and --grad_checkpoint may change)")
    p.add_argument("--overwrite", action="store_true", help="start a new run in an OUT_DIR that holds one, "
                   "replacing its checkpoint and log")
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
    for name in ("batch_size", "grad_accum", "max_len", "max_prompt_len", "max_iters", "eval_batches",
                 "n_layer", "n_head", "n_embd"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("warmup", "eval_interval", "weight_decay", "grad_clip"):
        if not getattr(args, name) >= 0:  # `not >=` also refuses nan
            parser.error(f"--{name} must not be negative, got {getattr(args, name)}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        parser.error(f"--lr must be a positive number, got {args.lr}")
    if not 0 <= args.dropout < 1:
        parser.error(f"--dropout is a probability in [0, 1), got {args.dropout}")
    if args.init == "scratch" and args.n_embd % args.n_head:
        parser.error(f"--n_embd {args.n_embd} must be a multiple of --n_head {args.n_head}")
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in OUT_DIR, --overwrite replaces it: pass one")
    if args.compile and not torch.cuda.is_available() and not shutil.which(os.environ.get("CC", "cc")):
        parser.error("--compile on a CPU needs a C compiler (torch.compile writes C++ kernels): install gcc "
                     "or drop --compile")
    check_device(parser, args.device)
    return args


def scratch_shape(args):
    """The GPTConfig fields of an --init scratch model."""
    return dict(block_size=args.max_len, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)


# ----------------------------------------------------------------------------------------------------
# Where and in which precision to compute

@dataclass
class Compute:
    """What a training step needs to know about the hardware, and under torchrun (DDP) about the other
    processes: `with compute_init(args) as compute:` leaves the process group at the end."""
    device: str                      # "cpu", "cuda", "cuda:1"
    dtype: str                       # "float32", "bfloat16" or "float16": the precision of the matmuls
    autocast: object                 # the context the forward passes run in
    scaler: torch.amp.GradScaler     # loss scaling, enabled for float16 only
    rank: int = 0                    # this process's number under torchrun; 0 without it
    world_size: int = 1              # processes training together; 1 without torchrun

    @property
    def master(self):
        """The one process that writes the log and the checkpoints (and prints)."""
        return self.rank == 0

    def sum(self, value):
        """value summed over the processes: a number, a list of numbers (as floats), or a tensor (in
        place, on this device). Without torchrun, value itself."""
        if self.world_size == 1:
            return value
        if isinstance(value, torch.Tensor):
            dist.all_reduce(value)
            return value
        tensor = torch.tensor(value, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()  # a number for a number, a list for a list

    def any(self, flag):
        """True on every process if flag is true on any: one process stopping stops them all."""
        if self.world_size == 1:
            return bool(flag)
        tensor = torch.tensor(int(bool(flag)), device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.world_size > 1:
            dist.destroy_process_group()


def compute_init(args):
    """Device, precision, autocast and GradScaler for a run; args.device and args.dtype become the
    resolved choices (so the checkpoint records what was used, not "auto"). Under torchrun, which sets
    RANK and WORLD_SIZE, the process also joins the others: one GPU each (nccl), or gloo on CPUs."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    args.device = pick_device(args.device)
    if world_size > 1:
        if args.grad_accum % world_size:
            raise UserError(f"--grad_accum {args.grad_accum} is the step's micro-batches in all, so it must be a "
                            f"multiple of the {world_size} processes (each does grad_accum / {world_size})")
        if args.device.startswith("cuda"):
            args.device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(args.device)
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        if rank != 0:
            sys.stdout = open(os.devnull, "w")  # one process speaks for all; errors still reach stderr
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
    return Compute(args.device, args.dtype, autocast, scaler, rank, world_size)


def distributed(model, compute):
    """Under torchrun, the model wrapped in DistributedDataParallel, which averages the gradients of all
    processes during backward; without torchrun, the model itself."""
    if compute.world_size == 1:
        return model
    return DDP(model, device_ids=[compute.device] if compute.device.startswith("cuda") else None)


def pick_device(device):
    """"auto", "cpu", "cuda", "cuda:N" or "mps", refused in one line when this machine has no such device."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "mps":
        if not torch.backends.mps.is_available():
            raise UserError("--device mps asked for, but this machine has no Apple GPU; use --device cpu")
        return device
    kind, _, index = device.partition(":")
    if kind != "cuda" or not (index == "" or index.isdigit()):
        raise UserError(f"--device {device} is not a device: use auto, cpu, cuda, cuda:N or mps")
    if not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for, but this machine has no CUDA GPU; use --device cpu")
    if index and int(index) >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                        f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
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


def optimizer_step(model, optimizer, scaler, grad_clip):
    """Apply the accumulated gradients: unscale them (fp16's GradScaler multiplied the loss so that small
    gradients would not underflow), clip their norm to grad_clip (0: no clipping), step, clear. Returns
    the norm before clipping, for the log."""
    scaler.unscale_(optimizer)  # clip the true gradient, not the fp16-scaled one
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    scaler.step(optimizer)  # skips the step if fp16 gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def eval_due(step, start, eval_interval):
    """Evaluate (then save) at every eval_interval-th step; 0 turns periodic evals off. A run resumed
    at step `start` skips the eval there: the run it continues logged it before saving that checkpoint."""
    return eval_interval > 0 and step % eval_interval == 0 and not (start and step == start)


def check_device(parser, device):
    """A --device this machine does not have is a usage error, found before anything is loaded."""
    try:
        pick_device(device)
    except UserError as e:
        parser.error(str(e))


# ----------------------------------------------------------------------------------------------------
# The run directory: one run an out_dir, never lost by accident, never saved broken

# Flags that define the experiment: --resume refuses when one differs from the checkpoint's. The rest
# may change on resume: --max_iters (upward), --eval_interval, --eval_batches (what is measured, and
# when), --device, --dtype, --compile, --grad_checkpoint (where, how fast and in how much memory, not
# what is trained).
SAME_ON_RESUME = ("init", "ref", "data", "train_split", "test_split", "target", "swap", "beta", "loss_type",
                  "label_smoothing", "optimizer", "batch_size", "grad_accum", "max_len", "max_prompt_len", "seed",
                  "lr", "warmup", "lr_decay_iters", "weight_decay", "grad_clip", "dropout", "share_prompt",
                  "precompute_ref", "n_layer", "n_head", "n_embd")
SCRATCH_ONLY = ("n_layer", "n_head", "n_embd")  # they shape the model only with --init scratch

# Nats per token of a uniform guess over GPT-2's 50,257 tokens. A model that gives the text it is
# trained on more than twice that has diverged: even a fresh random model scores about 1x.
UNIFORM_NLL = math.log(50257)


class OutDir:
    """OUT_DIR, claimed for one run. On entry it takes a lock (OUT_DIR/run.lock holds the PID; a lock
    whose process has ended is stale and replaced) and checks, before any data or model is loaded:
    that a new run does not land on a saved one, and that --resume continues the same experiment. It
    keeps track of the last good checkpoint, so every stop can say where it is."""

    def __init__(self, args, stage, compute):
        self.args, self.stage, self.compute = args, stage, compute
        self.path = args.out_dir
        self.ckpt = os.path.join(self.path, "ckpt.pt")
        self.lock = os.path.join(self.path, "run.lock")
        self.locked = False
        self.checkpoint = None   # with --resume: the checkpoint to continue from
        self.saved_step = None   # the step of the last good checkpoint in OUT_DIR, if any

    def __enter__(self):
        self.created = not os.path.exists(self.path)
        refusal = None
        try:
            if self.compute.master:  # under torchrun, process 0 holds the lock for all
                self._take_lock()
            self._check_checkpoint()
        except UserError as e:
            refusal = e
        if self.compute.any(refusal is not None):  # one process refusing stops them all
            self.__exit__()
            raise refusal or UserError("another process refused to start")
        return self

    def __exit__(self, *exc):
        if not self.locked:
            return
        os.remove(self.lock)
        if self.created and not os.listdir(self.path):
            os.rmdir(self.path)  # a run refused before it wrote anything leaves nothing behind

    def _take_lock(self):
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise UserError(f"--out_dir {self.path} is a file; give a directory")
        try:
            os.makedirs(self.path, exist_ok=True)
            try:
                descriptor = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                self._clear_stale_lock()
                descriptor = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            raise UserError(f"another run took {self.lock} just now; use another --out_dir") from None
        except OSError as e:
            raise UserError(f"cannot write to --out_dir {self.path} ({e.strerror}); give a directory you "
                            "can write to") from None
        with os.fdopen(descriptor, "w") as f:
            f.write(f"{os.getpid()} {socket.gethostname()}\n")
        self.locked = True

    def _clear_stale_lock(self):
        try:
            with open(self.lock) as f:
                pid, host = f.read().split()
            pid = int(pid)
        except (OSError, ValueError):
            pid, host = None, None  # unreadable: a lock torn by a crash while it was written
        if pid is not None and (host != socket.gethostname() or _process_alive(pid)):
            where = "" if host == socket.gethostname() else f" on {host}"
            raise UserError(f"{self.path} is in use by another run (PID {pid}{where}); wait for it to end or "
                            f"use another --out_dir (if no such run exists, delete {self.lock})")
        print(f"note: {self.lock} was left by a run that has ended (PID {pid}); taking it over")
        os.remove(self.lock)

    def _check_checkpoint(self):
        args, exists = self.args, os.path.isfile(self.ckpt)
        if not args.resume:
            if exists and not args.overwrite:
                raise UserError(f"{self.path} holds a run{self._step_of_existing()}: pass --resume to continue "
                                "it, --overwrite to replace it, or another --out_dir")
            return
        if not exists:
            raise UserError(f"--resume: {self.path} holds no ckpt.pt to continue; drop --resume to start a run")
        checkpoint = load_checkpoint(self.ckpt, resuming=True)
        written_by = checkpoint.get("stage")
        if written_by is not None and written_by != self.stage:
            raise UserError(f"{self.ckpt} was written by {written_by}.py: resume it with {written_by}.py, or give "
                            f"{self.stage}.py another --out_dir")
        differences = []
        for name in SAME_ON_RESUME:
            if name not in checkpoint["args"] or not hasattr(args, name):
                continue
            if name in SCRATCH_ONLY and args.init != "scratch":
                continue
            saved, now = checkpoint["args"][name], getattr(args, name)
            if saved != now:
                differences.append(f"--{name}: {saved} in the checkpoint, {now} now")
        if differences:
            hint = ""
            if any(d.startswith("--lr_decay_iters") for d in differences):
                hint = " (--lr_decay_iters defaults to --max_iters: pass the checkpoint's to keep its schedule)"
            raise UserError(f"--resume continues the same experiment, but {'; '.join(differences)}{hint}; pass "
                            "the checkpoint's values, or start a new run in another --out_dir")
        if args.max_iters <= checkpoint["iter"]:
            raise UserError(f"--max_iters {args.max_iters}: the run in {self.path} is already at step "
                            f"{checkpoint['iter']}; pass a larger --max_iters to train further")
        self.checkpoint, self.saved_step = checkpoint, checkpoint["iter"]

    def _step_of_existing(self):
        try:
            return f" at step {load_checkpoint(self.ckpt)['iter']}"
        except (UserError, KeyError):
            return " (its ckpt.pt is unreadable)"

    def kept(self):
        """Where the last good checkpoint is, for every message that stops a run."""
        if self.saved_step is None:
            return f"no checkpoint was saved in {self.path} by this run"
        return f"the last good checkpoint, step {self.saved_step}, is kept in {self.ckpt}"

    def save(self, step, model, optimizer, scaler):
        """Process 0 writes OUT_DIR/ckpt.pt; under torchrun the others wait until it has (or has failed).
        Step 0 (nothing trained yet) and the step already on disk are not written again."""
        if step == 0 or step == self.saved_step:
            return
        failure = None
        if self.compute.master:
            try:
                save_checkpoint(self.path, model, optimizer, scaler, step, self.args, self.stage)
            except OSError as e:  # a full disk, a quota: the old file is whole (atomic_write)
                failure = UserError(f"could not write the step-{step} checkpoint to {self.ckpt} "
                                    f"({e.strerror or e}); {self.kept()}")
        if self.compute.any(failure is not None):
            raise failure or UserError("process 0 could not save the checkpoint")
        self.saved_step = step
        print(f"saved {self.ckpt} at step {step}", flush=True)

    def check(self, step, loss, nll_per_token, what):
        """Stop the run before anything else is saved if the loss is not finite, or if the model gives
        the text it learns from more than 2 x UNIFORM_NLL nats per token (diverged)."""
        if not math.isfinite(loss):
            gpu_tip = " or --dtype bfloat16 if this GPU has it" if self.args.dtype == "float16" else ""
            raise UserError(f"the {what} loss is {loss} at step {step}: stopped; {self.kept()}. Try a lower "
                            f"--lr{gpu_tip}")
        if not nll_per_token <= 2 * UNIFORM_NLL:
            raise UserError(f"at step {step} the model gives the {what} text {nll_per_token:.4g} nats per token, "
                            f"worse than twice a uniform guess ({2 * UNIFORM_NLL:.1f}): it has diverged. Stopped; "
                            f"{self.kept()}. Try a lower --lr")


def _process_alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: no signal, only the check that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


def atomic_write(path, write):
    """write(tmp_path), then rename over path: a crash midway leaves the old file whole."""
    tmp = path + ".tmp"
    try:
        write(tmp)
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(out_dir, model, optimizer, scaler, iteration, args, stage=None):
    """OUT_DIR/ckpt.pt of plain types only, so torch.load(..., weights_only=True) reads it. Scripts
    compile in place (model.compile()), so the state_dict keys are the plain model's."""
    checkpoint = {
        "model": model.state_dict(),
        "config": asdict(model.config),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "iter": iteration,
        "stage": stage,  # which script wrote it: "sft" or "dpo"
        "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
        "rng": {"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }
    os.makedirs(out_dir, exist_ok=True)
    atomic_write(os.path.join(out_dir, "ckpt.pt"), lambda path: torch.save(checkpoint, path))


def load_checkpoint(path, resuming=False):
    """A ckpt.pt of ours, memory-mapped (tensors are read when used). Anything else is one line."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise UserError(f"no checkpoint at {path}") from None
    except Exception as e:  # not a zip, a torn file, random bytes: PyTorch's advice would only mislead here
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}); it should be a ckpt.pt "
                        "written by sft.py or dpo.py") from None
    needed = ("model", "config", "optimizer", "iter", "args", "rng") if resuming else ("model", "config")
    missing = [key for key in needed if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise UserError(f"{path} is not a checkpoint of ours (no {', '.join(missing)}); it should be a ckpt.pt "
                        "written by sft.py or dpo.py")
    return checkpoint


def resume(out_dir, model, optimizer, scaler):
    """Load the checkpoint OutDir checked into model, optimizer and scaler, restore the RNGs; the step
    to go on from."""
    path, checkpoint = out_dir.ckpt, out_dir.checkpoint
    model.load_weights(checkpoint["model"], where=path)
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (ValueError, KeyError) as e:
        raise UserError(f"the optimizer state in {path} does not fit this run's optimizer ({e}); resume "
                        "with the flags of the run that wrote it") from None
    if checkpoint["scaler"] is not None and scaler.is_enabled():
        scaler.load_state_dict(checkpoint["scaler"])
    torch.set_rng_state(checkpoint["rng"]["cpu"])  # dropout masks continue as in a straight run
    if torch.cuda.is_available() and checkpoint["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
    print(f"resuming from step {checkpoint['iter']}")
    out_dir.checkpoint = None  # the tensors now live in the model and optimizer
    return checkpoint["iter"]


# ----------------------------------------------------------------------------------------------------
# The log, and stopping

class RunLog:
    """One JSON object a line in OUT_DIR/log.jsonl, and a console line. A run resumed from step
    `start` keeps the records up to that step (in self.kept): those after it (logged before a crash,
    but not in the checkpoint) are about to be done again. A line cut off by a crash is dropped."""

    def __init__(self, out_dir, start=0, write=True):
        self.path = os.path.join(out_dir, "log.jsonl")
        self.kept, self.write = [], write  # write: False on all but process 0 under torchrun
        if not write:
            return
        if start and os.path.exists(self.path):
            with open(self.path) as f:
                for number, line in enumerate(f, start=1):
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        print(f"note: {self.path}:{number} is not a whole record (cut off by a crash?); dropped")
                        continue
                    if record["iter"] <= start:
                        self.kept.append(record)
        with open(self.path, "w") as f:
            f.writelines(json.dumps(record) + "\n" for record in self.kept)

    def __call__(self, record):
        if not self.write:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        shown = " | ".join(f"{k} {_short(v)}" for k, v in record.items() if k not in ("iter", "split"))
        print(f"{record['split']:5s} step {record['iter']:5d} | {shown}", flush=True)


def _short(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM (what `kill` and cluster schedulers send) set self.received instead
    of killing the run, so the loop can finish its step, save a checkpoint and stop. A second signal
    while stopping is only reported: it cannot interrupt the save."""

    def __init__(self, compute):
        self.compute = compute

    def __enter__(self):
        self.received = None
        self.previous = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handler(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received:
            print(f"\n{name}: already stopping after this step", flush=True)
            return
        self.received = name
        print(f"\n{name}: finishing this step, saving a checkpoint, then stopping", flush=True)

    def requested(self):
        """Whether to stop after this step: under torchrun, a signal to any process stops them all."""
        if not self.compute.any(self.received):
            return False
        print("stopping early: this step is saved; continue with --resume", flush=True)
        return True

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
