"""An out_dir holds one run: what sft.py, dpo.py and rlhf.py call, one line each, around their own loops.

    with Run(args, "dpo", EXPERIMENT, models) as run:       # one-line errors; the out_dir locked and checked
        start = run.start_or_resume(model, optimizer, held_out)  # log.jsonl opened, Ctrl-C caught; --resume: loaded
        for step in range(start, args.max_iters):
            if args.eval_interval and step % args.eval_interval == 0:
                run.evaluate_and_save(step, evaluate)       # evaluate, check health, then write ckpt.pt atomically
            ...                                             # the training step: the method, in the script
            run.log({"iter": step + 1, "loss": ...})        # log.jsonl and the console; a non-finite loss stops
            if run.stop_requested():                        # Ctrl-C or SIGTERM: finish this step, save, stop
                break
        run.finish(step + 1, evaluate)                      # the last checkpoint, and what to run next

OUT_DIR holds ckpt.pt (plain types only: torch.load(..., weights_only=True) reads it), log.jsonl and, while a
run goes, run.lock. Nothing broken is saved, by construction: every save follows an evaluation of those very
weights and a health check they pass. docs/runs.md lists every promise and the test that keeps it.
"""
import contextlib
import datetime
import hashlib
import json
import math
import os
import signal
import socket
import sys
from dataclasses import asdict

import numpy as np
import torch

from machinery import UserError
from machinery.cli import EXPERIMENT, SCRATCH_ONLY, Interrupted, user_errors
from machinery.compute import init_compute
from machinery.files import atomic_write, free_mb, resolved
from machinery.models import check_models, load_checkpoint, load_weights
from model import IGNORE_INDEX

# Nats per token of a uniform guess over GPT-2's 50,257 tokens. The health check stops a model that does
# worse than that on held-out text it is trained to write: it has lost all it knew.
UNIFORM_NLL = math.log(50257)
PATH_FLAGS = ("init", "ref", "data", "reward")  # compared as resolved paths on --resume (a symlink is the same run)


class Run:
    """A training run of `stage` ("sft", "dpo", ...) into args.out_dir. experiment: the script's own flags
    that define the experiment (--resume refuses a change); models: {flag: value} of the models it starts
    from or compares with (checked before anything is written); warn(step, metrics) -> a warning or None,
    after each evaluation (dpo.py's runaway warning)."""

    def __init__(self, args, stage, experiment=(), models=None, warn=None):
        self.args, self.stage, self.warn = args, stage, warn
        self.experiment = EXPERIMENT + tuple(experiment)
        self.models = models if models is not None else {"--init": args.init}
        self.path = args.out_dir
        self.ckpt, self.lock = os.path.join(self.path, "ckpt.pt"), os.path.join(self.path, "run.lock")
        self.locked, self.created = False, []  # directories this run made, removed again if left empty
        self.checkpoint = None  # with --resume: the checkpoint to continue from
        self.saved_step = None  # the step of the last checkpoint in OUT_DIR, if any
        self.warned_at = None   # the step of the first warning, said with every later checkpoint
        self.fingerprints = {}  # what the run depends on (depends_on)

    # ------------------------------------------------------------------------------------------------
    # Before anything is loaded: one-line errors, signals, the models named, the device, the out_dir

    def __enter__(self):
        with contextlib.ExitStack() as stack:  # if a part refuses, the parts already entered are left again
            stack.enter_context(user_errors())
            self.signals = stack.enter_context(StopSignals())  # first: a SIGTERM from here on is one line
            check_models(self.models, self.path, self.args.demo)
            self.compute = stack.enter_context(init_compute(self.args))
            stack.callback(self._release_lock)
            refusal = None
            try:
                if self.compute.master:  # under torchrun, process 0 holds the lock for all
                    self._take_lock()
                self._check_checkpoint()
            except UserError as e:
                refusal = e
            if self.compute.any(refusal is not None):  # one process refusing stops them all
                raise refusal or UserError("another process refused to start")
            self.stack = stack.pop_all()
        return self

    def __exit__(self, exc_type, exc, traceback):
        if exc is not None and self.compute.world_size > 1 and _peer_failure(exc):
            # under torchrun a process that died or froze shows here as a failed collective, deep in backward
            first = str(exc).strip().splitlines()[0].split(". ")[0][:160]  # gloo's first sentence
            try:
                raise UserError(f"process {self.compute.rank} of {self.compute.world_size}: a collective with the "
                                f"other processes failed ({first}); one of them stopped or froze (--dist_timeout "
                                f"{self.compute.timeout:g} s): see its output. {self.last_saved()}") from None
            except UserError:
                return self.stack.__exit__(*sys.exc_info())
        return self.stack.__exit__(exc_type, exc, traceback)

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
            self.locked = True
            with os.fdopen(descriptor, "w") as f:
                f.write(f"{os.getpid()} {socket.gethostname()}\n")
        except FileExistsError:
            raise UserError(f"another run took {self.lock} just now; use another --out_dir") from None
        except OSError as e:  # read-only, a full disk (the lock's few bytes), no permission
            self._release_lock()
            raise UserError(f"cannot write to --out_dir {self.path} ({e.strerror}); give a directory you can "
                            f"write to{', and free some space' if e.errno == 28 else ''}") from None

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

    def _release_lock(self):
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

    def _check_checkpoint(self):
        """A new run must not land on a saved one; --resume must continue the same experiment."""
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
            script = {"reward": "rlhf.py reward", "ppo": "rlhf.py ppo"}.get(written_by, f"{written_by}.py")
            raise UserError(f"{self.ckpt} was written by {script}: resume it with {script}, or give "
                            f"this one another --out_dir")
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

    # ------------------------------------------------------------------------------------------------
    # What a training loop calls

    def depends_on(self, data=None, models=None):
        """What the run depends on, fingerprinted into every checkpoint: data ({name: tokenized pairs}) and models
        ({name: (path, model)}, the DPO reference say). With --resume, refuses now, before anything is written,
        if one differs from what the run started with."""
        self.fingerprints = {name: data_fingerprint(pairs) for name, pairs in (data or {}).items()}
        self.fingerprints.update({name: model_fingerprint(*pair) for name, pair in (models or {}).items()})
        if self.args.resume:
            self._check_fingerprints(self.checkpoint.get("fingerprints", {}))

    def start_or_resume(self, model, optimizer, held_out, extra=None, health=None):
        """Continue the run in OUT_DIR (--resume: the checkpoint into model, optimizer and extra, {name: object with
        a state_dict} saved beside them) or begin a new one; returns the step to start from (0 for a new run).
        held_out, a batch (input_ids, labels) of text the model learns to write, is what the health check scores
        before every save; health: HealthCheck's measure and uniform for a model that writes no text, checks for
        more. Opens log.jsonl: the run's first write. From here on Ctrl-C and SIGTERM end the run after
        a whole step, saved."""
        self.model, self.optimizer, self.extra = model, optimizer, extra or {}
        start = self._load_checkpoint() if self.args.resume else 0
        self.health = HealthCheck(held_out, self.compute, model, **(health or {}))
        if self.compute.master:
            self._begin()
        self.log_file = RunLog(self.path, start, write=self.compute.master)
        parameters, args = sum(p.numel() for p in model.parameters()) / 1e6, self.args
        print(f"{parameters:.1f}M parameters, {args.device}, {args.dtype}; effective batch {args.batch_size} x "
              f"{args.grad_accum} = {args.batch_size * args.grad_accum} examples a step")
        if self.compute.world_size > 1:
            print(f"torchrun: {self.compute.world_size} processes, {args.grad_accum // self.compute.world_size} "
                  "micro-batches each per step")
        self.signals.catch()
        return start

    def evaluate_and_save(self, step, evaluate):
        """Evaluate the model as it is at `step` (evaluate() -> {metric: value}), log that, check its health,
        and only then write ckpt.pt (not at step 0: nothing is trained yet). The step already on disk (where a
        resumed run starts) is neither evaluated nor written again. If the evaluation itself crashes, the
        weights are saved if the health check's own forward pass finds them healthy, and the crash goes on."""
        if step == self.saved_step:
            return
        try:
            metrics = evaluate()
        except (UserError, Interrupted, KeyboardInterrupt):
            raise
        except Exception:
            print(f"the evaluation at step {step} failed; checking the weights on one held-out micro-batch "
                  "before saving them", flush=True)
            self.health.check(step, {}, self.last_saved())
            self._write(step)
            raise
        self.log_file({"iter": step, "split": "test", **metrics})
        warning = self.warn(step, metrics) if self.warn else None
        if warning and self.warned_at is None:
            print(f"warning: at step {step} {warning}", flush=True)
            self.warned_at = step
        self.health.check(step, metrics, self.last_saved())
        self._write(step)

    def log(self, record):
        """Log a training step ({"iter": ..., "loss": ..., ...}); a loss that is not finite stops the run."""
        check_losses(record, self.compute.dtype, self.last_saved())
        self.log_file({"iter": record["iter"], "split": "train", **{k: v for k, v in record.items() if k != "iter"}})

    def stop_requested(self):
        """Whether Ctrl-C or SIGTERM came (to any process, under torchrun): the step is done; save and stop."""
        return self.signals.requested(self.compute)

    def finish(self, step, evaluate):
        """The last checkpoint, evaluated, checked and saved; then what to run next, or how to go on."""
        self.evaluate_and_save(step, evaluate)
        if step < self.args.max_iters:
            print(f"stopping early at step {step}: saved; continue with --resume", flush=True)
        elif getattr(self.args, "next", None):
            print(f"next: {self.args.next}")

    def last_saved(self):
        """Where the last checkpoint is, for every message that stops a run."""
        if self.saved_step is None:
            return f"no checkpoint was saved in {self.path} by this run"
        warned = f" (past the warning of step {self.warned_at})" if self.warned_at is not None else ""
        return f"the last checkpoint, step {self.saved_step}, which passed the health check, is kept in {self.ckpt}{warned}"

    # ------------------------------------------------------------------------------------------------
    # Reading and writing the checkpoint

    def _check_fingerprints(self, saved):
        """One line saying what the run depends on that changed since it started, if anything did."""
        for name, then in saved.items():
            now = self.fingerprints.get(name)
            if now is None or then.get("sha256") == now.get("sha256"):
                continue
            if "pairs" in then:
                change = (f"{then['pairs']} pairs then, {now['pairs']} now" if then["pairs"] != now["pairs"]
                          else "as many pairs, other tokens")
                raise UserError(f"--resume: --data {self.args.data} no longer gives the {name} this run started with "
                                f"({change}); resume with the same data, or start a new run in another --out_dir")
            if then.get("iter") is not None and then.get("iter") != now.get("iter"):
                change = f"was at step {then['iter']} when this run started, it is at step {now.get('iter')} now"
            else:
                change = "holds other weights than when this run started"
            raise UserError(f"--resume: the {name} {now['path']} {change}; the run is measured against a fixed "
                            f"{name}: resume against the same one, or start a new run in another --out_dir")

    def _load_checkpoint(self):
        """The checkpoint _check_checkpoint read, into the model, the optimizer, the scaler and the extra
        objects, and the random-number states: the step to go on from."""
        checkpoint = self.checkpoint
        load_weights(self.model, checkpoint["model"], where=self.ckpt)
        for name, part in self.extra.items():
            part.load_state_dict(checkpoint.get("extra", {})[name])
        try:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        except (ValueError, KeyError) as e:
            raise UserError(f"the optimizer state in {self.ckpt} does not fit this run's optimizer ({e}); resume "
                            "with the flags of the run that wrote it") from None
        if checkpoint["scaler"] is not None and self.compute.scaler.is_enabled():
            self.compute.scaler.load_state_dict(checkpoint["scaler"])
        torch.set_rng_state(checkpoint["rng"]["cpu"])  # dropout masks continue as in a straight run
        if torch.cuda.is_available() and checkpoint["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
        print(f"resuming from step {checkpoint['iter']}")
        self.checkpoint = None  # the tensors now live in the model and optimizer
        return checkpoint["iter"]

    def _begin(self):
        """The run's first write. With --overwrite, the old run's ckpt.pt and log.jsonl move, whole, to
        OUT_DIR/replaced-TIME/ first: nothing saved is lost, and nothing of it is mixed with the new run."""
        old = [name for name in ("ckpt.pt", "log.jsonl") if os.path.isfile(os.path.join(self.path, name))]
        if not (self.args.overwrite and "ckpt.pt" in old):
            return
        step = self._step_of_existing()
        aside = os.path.join(self.path, "replaced-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
        try:
            os.makedirs(aside)
            for name in old:
                os.replace(os.path.join(self.path, name), os.path.join(aside, name))
        except OSError as e:
            raise UserError(f"--overwrite: cannot move the old run aside to {aside} ({e.strerror}); nothing "
                            "was replaced") from None
        print(f"--overwrite: the run{step} was moved to {aside}")

    def _write(self, step):
        """Process 0 writes OUT_DIR/ckpt.pt; under torchrun the others wait until it has (or has failed)."""
        if step == 0 or step == self.saved_step:
            return
        failure = None
        if self.compute.master:
            try:
                save_checkpoint(self.path, self.model, self.optimizer, self.compute.scaler, step, self.args,
                                self.stage, self.fingerprints, self.extra)
            except Exception as e:  # a full disk or a quota: OSError, or RuntimeError from torch.save
                failure = UserError(f"could not write the step-{step} checkpoint to {self.ckpt} ({_reason(e)}; "
                                    f"it needs about {_checkpoint_mb(self.model, self.optimizer):.0f} MB, "
                                    f"{free_mb(self.path):.0f} MB are free); {self.last_saved()}")
        if self.compute.any(failure is not None):
            raise failure or UserError("process 0 could not save the checkpoint")
        self.saved_step = step
        print(f"saved {self.ckpt} at step {step}", flush=True)


def check_losses(record, dtype, last_saved):
    """A step whose loss (or value loss, ...) is not finite stops the run at once: its weights are never saved."""
    for name, value in record.items():
        if name.endswith("loss") and not math.isfinite(value):
            tip = " or --dtype bfloat16 if this GPU has it" if dtype == "float16" else ""
            flag = "--value_lr" if name == "value_loss" else "--lr"
            raise UserError(f"the training {name.replace('_', ' ')} is {value} at step {record['iter']}: stopped; "
                            f"{last_saved}. Try a lower {flag}{tip}")


def save_checkpoint(out_dir, model, optimizer, scaler, iteration, args, stage=None, fingerprints=None, extra=None):
    """OUT_DIR/ckpt.pt of plain types only, so torch.load(..., weights_only=True) reads it. Scripts compile in
    place (model.compile()), so the state_dict keys are the plain model's. extra: more objects with a
    state_dict (rlhf.py's value model and its optimizer), saved by name."""
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


def data_fingerprint(tokenized):
    """Tokenized pairs hashed: the same --data gives the same pairs, or it changed."""
    digest = hashlib.sha256()
    for pair in tokenized:
        for field in ("prompt", "chosen", "rejected"):
            digest.update(np.asarray(pair[field], dtype=np.int64).tobytes() + b"|")
    return {"pairs": len(tokenized), "sha256": digest.hexdigest()}


def model_fingerprint(path, model):
    """A model's weights hashed, and for one of our checkpoints the step and script that wrote it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().reshape(-1).cpu().view(torch.uint8).numpy())  # the bytes, not a copy
    found = {"path": path, "sha256": digest.hexdigest()}
    if os.path.isfile(os.path.join(path, "ckpt.pt")):
        saved = load_checkpoint(os.path.join(path, "ckpt.pt"))
        found.update(stage=saved.get("stage"), iter=saved.get("iter"))
    return found


def _reason(error):
    return getattr(error, "strerror", None) or str(error).strip().splitlines()[-1][:120] or type(error).__name__


def _checkpoint_mb(model, optimizer):
    tensors = list(model.state_dict().values())
    tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _process_alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: no signal, only the check that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


def _peer_failure(error):
    """Whether an exception is gloo's or NCCL's: a peer that closed its connection or never answered."""
    markers = ("gloo", "NCCL", "Connection closed by peer", "Connection reset by peer", "Timed out")
    return isinstance(error, RuntimeError) and any(marker in str(error) for marker in markers)


# ----------------------------------------------------------------------------------------------------
# log.jsonl

class RunLog:
    """One JSON object a line in OUT_DIR/log.jsonl, and a console line. A run resumed from step `start` keeps
    the records up to that step (in self.records): those after it (logged before a crash, but not in the
    checkpoint) are about to be done again. A line that is not a whole record is dropped with a notice."""

    def __init__(self, out_dir, start=0, write=True):
        self.path = os.path.join(out_dir, "log.jsonl")
        self.records, self.write = [], write  # write: False on all but process 0 under torchrun
        if not write:
            return
        if start:
            self.records = [r for r in read_records(self.path, notice=True) if r["iter"] <= start]

        def rewrite(path):
            with open(path, "w") as f:
                f.writelines(json.dumps(record) + "\n" for record in self.records)
        try:
            atomic_write(self.path, rewrite)
        except OSError as e:
            raise UserError(f"cannot write {self.path} ({e.strerror})") from None

    def __call__(self, record):
        if not self.write:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # OUT_DIR deleted, the disk full: the run cannot be kept, so it stops
            raise UserError(f"cannot write {self.path} ({e.strerror}; was {os.path.dirname(self.path)} deleted or "
                            "its disk filled?): stopped") from None
        self.records.append(record)
        shown = " | ".join(f"{k} {_short(v)}" for k, v in record.items() if k not in ("iter", "split"))
        print(f"{record['split']:5s} step {record['iter']:5d} | {shown}", flush=True)


def read_records(path, notice=False):
    """The records of a log.jsonl: objects with a whole-number "iter" and a "split". Other lines (torn by a
    crash, not JSON, not UTF-8) are dropped, with a notice naming each if notice."""
    records = []
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except FileNotFoundError:
        return records
    except IsADirectoryError:
        raise UserError(f"{path} is a directory, not a run's log: move it away") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
            if isinstance(record, dict) and type(record.get("iter")) is int and isinstance(record.get("split"), str):
                records.append(record)
                continue
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass
        if notice:
            print(f"note: {path}:{number} is not a whole record (cut off by a crash?); dropped")
    return records


def _short(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------------------------------
# The health check: weights are saved only after they pass

class HealthCheck:
    """Is a model fit to be saved? It must give held-out text it is trained to write (held_out: a batch of
    (input_ids, labels), scored on its labelled tokens) a finite loss of at most `cut` nats per token: a
    uniform guess over the vocabulary (UNIFORM_NLL, 10.8 nats), for a model that does worse on such text
    has lost all it knew; or, for a run from random weights, which starts at about that, its start plus
    one nat (e times less likely per token than where it began). A model that writes no text (a reward
    model) gives its own measure(model, held_out) and the loss of a uniform guess (ln 2 for a pair).
    checks: more functions, each () -> what is wrong or None (rlhf.py's value model)."""

    def __init__(self, held_out, compute, model, measure=None, uniform=UNIFORM_NLL, checks=()):
        self.held_out = [t.to(compute.device) for t in held_out]
        self.compute, self.model, self.measure, self.uniform, self.checks = compute, model, measure, uniform, checks
        self.cut = max(uniform, self.nll_per_token() + 1)

    @torch.no_grad()
    def nll_per_token(self):
        model, training = self.model, self.model.training
        model.eval()
        with self.compute.autocast:
            if self.measure is not None:
                loss = self.measure(model, self.held_out)
            else:
                input_ids, labels = self.held_out
                loss = -model(input_ids, labels).sum().item() / max(1, (labels != IGNORE_INDEX).sum().item())
        model.train(training)
        return loss

    def check(self, step, metrics, last_saved):
        """Raise a UserError that stops the run if the held-out loss is not finite or the model has diverged."""
        loss = metrics.get("loss", 0.0)
        nll = self.nll_per_token()
        if self.compute.any(not math.isfinite(loss)):
            cause = ("at step 0, before any update, so not the learning rate: check the loss's flags (--beta) and "
                     "the data" if step == 0 else "Try a lower --lr" + (" or --dtype bfloat16 if this GPU has it"
                                                                         if self.compute.dtype == "float16" else ""))
            raise UserError(f"the held-out loss is {loss} at step {step}: stopped; {last_saved}. {cause}")
        if self.compute.any(not nll <= self.cut):  # `not <=`: nan fails too
            limit = "a uniform guess" if self.cut == self.uniform else "its start by over a nat"
            raise UserError(f"at step {step} the model gives held-out text it learns to write {nll:.4g} nats per "
                            f"token, worse than {limit} ({self.cut:.1f}): it has diverged. Stopped; {last_saved}. "
                            "Try a lower --lr")
        for check in self.checks:
            problem = check()
            if self.compute.any(problem is not None):
                raise UserError(f"at step {step} {problem}. Stopped; {last_saved}")


def runaway_warning(beta, nats=5.0):
    """DPO's runaway warning, as Run's warn: the policy gives the held-out chosen responses more than `nats`
    less log-probability (per pair, on average) than the reference does. DPO only asks the chosen-minus-
    rejected margin to grow, and lowering both log-probs is a cheap way to grow it; a little is normal, but
    5 nats is e^5 = 148 times less likely: the mass is going to text in neither response. A warning, not a
    stop: the model still passes the health check."""
    def warn(step, metrics):
        drop = -metrics["rewards/chosen"] / beta  # log pi_ref(y_w|x) - log pi(y_w|x), mean over pairs
        if drop > nats:
            return (f"the policy gives the held-out chosen responses {drop:.1f} nats less than the reference does "
                    f"(over {nats:g}): probability is going to text in neither response and samples may degrade; "
                    "try a lower --lr or a higher --beta")
    return warn


# ----------------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM

class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM (what `kill` and cluster schedulers send). Before the training loop they
    stop the run at once, with one line and nothing saved (cli.user_errors says it). Inside the loop
    (after catch()) they set self.received instead, so the loop finishes its step, evaluates, saves and
    stops; a second signal then is only reported: it cannot interrupt the save, nor, once the run has
    stopped on a signal, the process's exit (the handlers stay until it exits)."""

    def __init__(self):
        self.catching, self.received = False, None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def catch(self):
        self.catching = True

    def _handler(self, signum, frame):
        name = signal.Signals(signum).name
        if not self.catching:
            raise Interrupted(name)
        if self.received:
            print(f"\n{name}: already stopping", flush=True)
            return
        self.received = name
        print(f"\n{name}: finishing this step, then evaluating, saving and stopping", flush=True)

    def requested(self, compute=None):
        """Whether to stop after this step: under torchrun, a signal to any process stops them all."""
        return compute.any(self.received) if compute is not None else bool(self.received)

    def __exit__(self, *exc):
        if self.received:  # stopping on a signal: a second one must not turn a clean exit into 130 or 143
            return
        for s, handler in self.previous.items():
            signal.signal(s, handler)
