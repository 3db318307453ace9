"""Run directories and checkpoints: one run an out_dir, a lock, atomic saves, and --resume that continues
the same experiment (same flags, same data, same reference) or says what changed.

OUT_DIR/ckpt.pt holds plain types only (torch.load(..., weights_only=True) reads it): the weights, the
optimizer and GradScaler states, the step, the flags, the random-number states, which script wrote it,
and fingerprints of what the run depends on (the training data, the DPO reference).
"""
import datetime
import hashlib
import os
import shutil
import socket
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.nn as nn

from machinery import UserError
from machinery.cli import EXPERIMENT, SCRATCH_ONLY, scratch_shape
from model import GPT, GPT2_SIZES, GPTConfig, CausalSelfAttention

PATH_FLAGS = ("init", "ref", "data")  # compared as resolved paths on --resume (a symlink is the same run)


class OutDir:
    """OUT_DIR, claimed for one run. On entry it takes a lock (OUT_DIR/run.lock holds the PID; a lock
    whose process has ended is stale and replaced) and checks, before any data or model is loaded:
    that a new run does not land on a saved one, and that --resume continues the same experiment. It
    keeps track of the last checkpoint saved, so every stop can say where it is."""

    def __init__(self, args, stage, compute, experiment=()):
        self.args, self.stage, self.compute = args, stage, compute
        self.experiment = EXPERIMENT + tuple(experiment)
        self.path = args.out_dir
        self.ckpt = os.path.join(self.path, "ckpt.pt")
        self.lock = os.path.join(self.path, "run.lock")
        self.locked = False
        self.created = []        # directories this run made, removed again if it leaves them empty
        self.checkpoint = None   # with --resume: the checkpoint to continue from
        self.saved_step = None   # the step of the last checkpoint in OUT_DIR, if any
        self.note = ""           # said after the last checkpoint's step (the runaway warning, say)

    def __enter__(self):
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
        self.locked = False
        try:
            os.remove(self.lock)
        except FileNotFoundError:
            pass  # OUT_DIR was deleted while the run was going: already said
        for directory in reversed(self.created):  # a run refused before it wrote anything leaves nothing
            if os.path.isdir(directory) and not os.listdir(directory):
                os.rmdir(directory)

    def _take_lock(self):
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise UserError(f"--out_dir {self.path} is a file; give a directory")
        missing, parent = [], os.path.abspath(self.path)
        while not os.path.exists(parent):
            missing.append(parent)
            parent = os.path.dirname(parent)
        try:
            os.makedirs(self.path, exist_ok=True)
            self.created = list(reversed(missing))
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
        saved_paths = checkpoint.get("paths", {})
        for name in self.experiment:
            if name not in checkpoint["args"] or not hasattr(args, name):
                continue
            if name in SCRATCH_ONLY and args.init != "scratch":
                continue
            saved, now = checkpoint["args"][name], getattr(args, name)
            if name in PATH_FLAGS and resolved(now) == saved_paths.get(name, resolved(saved)):
                continue  # the same file or directory, by another name (a symlink, a relative path)
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

    def begin(self):
        """The run's first write. With --overwrite, the old run's ckpt.pt and log.jsonl move, whole, to
        OUT_DIR/replaced-TIME/ first: nothing saved is lost, and nothing of it is mixed with the new run."""
        old = [name for name in ("ckpt.pt", "log.jsonl") if os.path.isfile(os.path.join(self.path, name))]
        if not (self.args.overwrite and self.compute.master and "ckpt.pt" in old):
            return
        step = self._step_of_existing()
        aside = os.path.join(self.path, "replaced-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
        os.makedirs(aside)
        for name in old:
            os.replace(os.path.join(self.path, name), os.path.join(aside, name))
        print(f"--overwrite: the run{step} was moved to {aside}")

    def last_saved(self):
        """Where the last checkpoint is, for every message that stops a run."""
        if self.saved_step is None:
            return f"no checkpoint was saved in {self.path} by this run"
        return f"the last checkpoint, step {self.saved_step}, which passed the health check, is kept in {self.ckpt}{self.note}"

    def save(self, step, model, optimizer, scaler, fingerprints, extra=None):
        """Process 0 writes OUT_DIR/ckpt.pt; under torchrun the others wait until it has (or has failed).
        Step 0 (nothing trained yet) and the step already on disk are not written again. The caller
        (run.Run.checkpoint) has checked the weights first."""
        if step == 0 or step == self.saved_step:
            return
        failure = None
        if self.compute.master:
            try:
                save_checkpoint(self.path, model, optimizer, scaler, step, self.args, self.stage, fingerprints, extra)
            except Exception as e:  # a full disk or a quota: OSError, or RuntimeError from torch.save
                failure = UserError(f"could not write the step-{step} checkpoint to {self.ckpt} ({_reason(e)}; "
                                    f"it needs about {_checkpoint_mb(model, optimizer):.0f} MB, "
                                    f"{_free_mb(self.path):.0f} MB are free); {self.last_saved()}")
        if self.compute.any(failure is not None):
            raise failure or UserError("process 0 could not save the checkpoint")
        self.saved_step = step
        print(f"saved {self.ckpt} at step {step}", flush=True)


def _reason(error):
    return getattr(error, "strerror", None) or str(error).strip().splitlines()[-1][:120] or type(error).__name__


def _checkpoint_mb(model, optimizer):
    tensors = list(model.state_dict().values())
    tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _free_mb(path):
    try:
        return shutil.disk_usage(path).free / 2**20
    except OSError:
        return float("nan")


def _process_alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: no signal, only the check that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


def resolved(value):
    """A path as the file system resolves it (symlinks, ..), or the value itself if it is no path."""
    return os.path.realpath(value) if isinstance(value, str) and os.path.exists(value) else value


def atomic_write(path, write):
    """write(tmp_path), then rename over path: a crash midway leaves the old file whole, and no .tmp."""
    tmp = path + ".tmp"
    try:
        write(tmp)
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half
    finally:
        try:
            os.remove(tmp)
        except OSError:
            pass


def save_checkpoint(out_dir, model, optimizer, scaler, iteration, args, stage=None, fingerprints=None, extra=None):
    """OUT_DIR/ckpt.pt of plain types only, so torch.load(..., weights_only=True) reads it. Scripts
    compile in place (model.compile()), so the state_dict keys are the plain model's. extra: more objects
    with a state_dict (rlhf.py's value model and its optimizer), saved by name."""
    flags = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}
    checkpoint = {
        "model": model.state_dict(),
        "config": asdict(model.config),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "iter": iteration,
        "stage": stage,  # which script wrote it: "sft", "dpo", ...
        "args": flags,
        "paths": {name: resolved(flags[name]) for name in PATH_FLAGS if isinstance(flags.get(name), str)},
        "fingerprints": fingerprints or {},
        "extra": {name: part.state_dict() for name, part in (extra or {}).items()},
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


def stage_of(directory):
    """The script that wrote the checkpoint in directory ("sft", "dpo", ...), or None."""
    path = os.path.join(directory, "ckpt.pt")
    return load_checkpoint(path).get("stage") if os.path.isfile(path) else None


# ----------------------------------------------------------------------------------------------------
# What a run depends on, fingerprinted: --resume refuses to continue against other data or another reference

def data_fingerprint(tokenized):
    """The training pairs' token ids, hashed: the same --data gives the same pairs, or it changed."""
    digest = hashlib.sha256()
    for pair in tokenized:
        for field in ("prompt", "chosen", "rejected"):
            digest.update(np.asarray(pair[field], dtype=np.int64).tobytes() + b"|")
    return {"pairs": len(tokenized), "sha256": digest.hexdigest()}


def model_fingerprint(path, model):
    """A model's weights hashed, and for one of our checkpoints the step and script that wrote it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + tensor.detach().reshape(-1).cpu().view(torch.uint8).numpy().tobytes())
    found = {"path": path, "sha256": digest.hexdigest()}
    if os.path.isfile(os.path.join(path, "ckpt.pt")):
        saved = load_checkpoint(os.path.join(path, "ckpt.pt"))
        found.update(stage=saved.get("stage"), iter=saved.get("iter"))
    return found


def check_fingerprints(saved, now, data_source):
    """One line saying what changed since the run started, if anything did."""
    if "data" in saved and saved["data"] != now.get("data"):
        then, current = saved["data"]["pairs"], now["data"]["pairs"]
        change = f"{then} pairs then, {current} now" if then != current else "as many pairs, other tokens"
        raise UserError(f"--resume: --data {data_source} no longer gives the training pairs this run started "
                        f"with ({change}); resume with the same data, or start a new run in another --out_dir")
    if "reference" in saved and saved["reference"].get("sha256") != now.get("reference", {}).get("sha256"):
        then, current = saved["reference"], now["reference"]
        if then.get("iter") is not None and then.get("iter") != current.get("iter"):
            change = f"was at step {then['iter']} when this run started, it is at step {current.get('iter')} now"
        else:
            change = "holds other weights than when this run started"
        raise UserError(f"--resume: the reference {current['path']} {change}; DPO measures the policy against a "
                        "fixed reference: resume against the same one, or start a new run in another --out_dir")


def resume(out_dir, model, optimizer, scaler, extra=None):
    """Load the checkpoint OutDir checked into model, optimizer, scaler and the extra objects, restore the
    RNGs; the step to go on from."""
    path, checkpoint = out_dir.ckpt, out_dir.checkpoint
    load_weights(model, checkpoint["model"], where=path)
    for name, part in (extra or {}).items():
        part.load_state_dict(checkpoint.get("extra", {})[name])
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
# The model a run trains: from scratch, one of our checkpoints, a Hugging Face directory or a GPT-2 name

def check_models(models, out_dir, demo=False):
    """Fail in one line, before anything is written, if a model flag ({flag: value}) names nothing, or if
    the run would write over a model it starts from or compares with."""
    for flag, name in models.items():
        if name in GPT2_SIZES or name == "scratch":
            continue
        if not os.path.exists(name):
            raise UserError(f"no model at {flag} {name}: run `python sft.py{' --demo' if demo else ''}` first, "
                            "or pass gpt2 (or another GPT-2 name), a Hugging Face directory or a checkpoint directory")
        if os.path.realpath(name) == os.path.realpath(out_dir):
            raise UserError(f"--out_dir {out_dir} is also {flag}: writing there would replace it; give another --out_dir")


def open_model(path):
    """A GPT from one of our checkpoint directories, a Hugging Face directory or a GPT-2 name."""
    from machinery.weights import load_pretrained  # weights builds on this module's errors
    if os.path.isfile(os.path.join(path, "ckpt.pt")):
        checkpoint = load_checkpoint(os.path.join(path, "ckpt.pt"))
        known = {f.name for f in fields(GPTConfig)}  # a checkpoint's config, less fields of older versions
        model = GPT(GPTConfig(**{k: v for k, v in checkpoint["config"].items() if k in known}))
        load_weights(model, checkpoint["model"], where=path)
        return model
    if os.path.isfile(os.path.join(path, "log.jsonl")) and not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{path} holds a run that never saved a checkpoint (a log.jsonl, no ckpt.pt): let it "
                        "train to its first checkpoint, or give another model")
    return load_pretrained(path)


def load_model(init, args):
    """The model a run starts from, on args.device: a fresh GPT for init "scratch" (shape from --n_layer,
    --n_head, --n_embd, block_size --max_len), else open_model(init). Dropout is a training choice, not
    part of the weights, so it is set here; --max_len must fit the model's position table."""
    model = GPT(GPTConfig(dropout=args.dropout, **scratch_shape(args))) if init == "scratch" else open_model(init)
    set_dropout(model, args.dropout)
    if args.max_len > model.config.block_size:
        raise UserError(f"--max_len {args.max_len} is longer than {init}'s block_size {model.config.block_size}")
    return model.to(args.device)


def set_dropout(model, p):
    model.config.dropout = p
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        if isinstance(module, CausalSelfAttention):
            module.dropout = p


def check_same_shape(policy, reference, init, ref):
    """DPO starts the policy at its reference: the two must be the same architecture."""
    a, b = policy.config, reference.config
    if (a.n_layer, a.n_head, a.n_embd, a.vocab_size) != (b.n_layer, b.n_head, b.n_embd, b.vocab_size):
        raise UserError(f"--init {init} ({a.n_layer} layers x {a.n_embd}) and --ref {ref} ({b.n_layer} layers x "
                        f"{b.n_embd}) differ in shape; DPO starts the policy at the reference")


def load_weights(model, state, where="checkpoint"):
    """load_state_dict, after check_state has given any mismatch as one line."""
    check_state({k: v.shape for k, v in model.state_dict().items()}, state, f"the weights in {where}")
    model.load_state_dict(state)


def check_state(expected, state, where):
    """One line naming missing or unexpected keys, or the first key whose shape differs (both shapes)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(f"{where} do not fit the model: missing keys {missing[:3]}, unexpected keys {unexpected[:3]}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != tuple(shape):
            raise UserError(f"{where} do not fit the model: {key} has shape {tuple(state[key].shape)} there, "
                            f"{tuple(shape)} here")
