"""The run log (OUT_DIR/log.jsonl), the health checks that decide whether weights may be saved, and
stopping cleanly on Ctrl-C and SIGTERM."""
import json
import math
import os
import signal

import torch

from machinery import UserError
from machinery.checkpoints import atomic_write
from machinery.cli import Interrupted
from model import IGNORE_INDEX

# Nats per token of a uniform guess over GPT-2's 50,257 tokens. Health.check stops a model that does
# worse than that on held-out text it is trained to write: it has lost all it knew.
UNIFORM_NLL = math.log(50257)


class RunLog:
    """One JSON object a line in OUT_DIR/log.jsonl, and a console line. A run resumed from step
    `start` keeps the records up to that step (in self.records): those after it (logged before a crash,
    but not in the checkpoint) are about to be done again. A line that is not a whole record (cut off by a
    crash, or garbage) is dropped with a notice."""

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


def eval_due(step, start, eval_interval):
    """Evaluate (then save) at every eval_interval-th step; 0 turns periodic evals off. A run resumed
    at step `start` skips the eval there: the run it continues evaluated it before saving that checkpoint."""
    return eval_interval > 0 and step % eval_interval == 0 and not (start and step == start)


# ----------------------------------------------------------------------------------------------------
# Health: weights are saved only after they pass

class Health:
    """Is a model fit to be saved? It must give held-out text it is trained to write (held_out: a batch of
    (input_ids, labels), scored on its labelled tokens) a finite loss of at most `cut` nats per token: a
    uniform guess over the vocabulary (UNIFORM_NLL, 10.8 nats), for a model that does worse on such text
    has lost all it knew; or, for a run from random weights, which starts at about that, its start plus
    one nat (e times less likely per token than where it began). A model that writes no text (a reward
    model) gives its own measure(model, held_out) and the loss of a uniform guess (ln 2 for a pair)."""

    def __init__(self, held_out, compute, model, measure=None, uniform=UNIFORM_NLL):
        self.held_out = [t.to(compute.device) for t in held_out]
        self.compute, self.measure, self.uniform = compute, measure, uniform
        self.cut = max(uniform, self.nll_per_token(model) + 1)

    @torch.no_grad()
    def nll_per_token(self, model):
        training = model.training
        model.eval()
        with self.compute.autocast:
            if self.measure is not None:
                loss = self.measure(model, self.held_out)
            else:
                input_ids, labels = self.held_out
                loss = -model(input_ids, labels).sum().item() / max(1, (labels != IGNORE_INDEX).sum().item())
        model.train(training)
        return loss

    def check(self, model, step, metrics, last_saved):
        """Raise a UserError that stops the run if the held-out loss is not finite or the model has diverged."""
        loss = metrics.get("loss", 0.0)
        nll = self.nll_per_token(model)
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


def check_training_loss(loss, step, dtype, last_saved):
    """A step whose loss is not finite stops the run at once (the weights it leaves are never saved)."""
    if not math.isfinite(loss):
        tip = " or --dtype bfloat16 if this GPU has it" if dtype == "float16" else ""
        raise UserError(f"the training loss is {loss} at step {step}: stopped; {last_saved}. Try a lower --lr{tip}")


class Runaway:
    """DPO's runaway warning: the policy gives the held-out chosen responses more than `nats` less
    log-probability (per pair, on average) than the reference does. DPO only asks the chosen-minus-
    rejected margin to grow, and lowering both log-probs is a cheap way to grow it; a little is normal,
    but 5 nats is e^5 = 148 times less likely: the mass is going to text in neither response. A warning,
    not a stop: the model still passes the health check, and messages that name a later checkpoint say so."""

    def __init__(self, beta, nats=5.0):
        self.beta, self.nats, self.step = beta, nats, None

    def __call__(self, step, metrics):
        drop = -metrics["rewards/chosen"] / self.beta  # log pi_ref(y_w|x) - log pi(y_w|x), mean over pairs
        if drop > self.nats and self.step is None:
            print(f"warning: at step {step} the policy gives the held-out chosen responses {drop:.1f} nats less "
                  f"than the reference does (over {self.nats:g}): probability is going to text in neither "
                  "response and samples may degrade; try a lower --lr or a higher --beta", flush=True)
            self.step = step

    def note(self):
        return "" if self.step is None else f" (past the runaway warning of step {self.step})"


# ----------------------------------------------------------------------------------------------------
# Signals

class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM (what `kill` and cluster schedulers send). Before the training loop they
    stop the run at once, with one line and nothing saved (cli.user_errors says it). Inside the loop
    (after catch()) they set self.received instead, so the loop finishes its step, evaluates, saves and
    stops; a second signal then is only reported: it cannot interrupt the save."""

    def __init__(self, compute=None):
        self.compute, self.catching, self.received = compute, False, None

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
            print(f"\n{name}: already stopping after this step", flush=True)
            return
        self.received = name
        print(f"\n{name}: finishing this step, then evaluating, saving and stopping", flush=True)

    def requested(self):
        """Whether to stop after this step: under torchrun, a signal to any process stops them all."""
        return self.compute.any(self.received) if self.compute else bool(self.received)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
