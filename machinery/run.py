"""Run: the one object a training loop talks to, so that the loop itself can hold only the method.

    with Run(args, "dpo", EXPERIMENT) as run:                 # one-line errors, device, out_dir lock, signals
        start = run.start(model, optimizer, evaluate, held_out, data=train_pairs)  # --resume, health, log.jsonl
        for step in run.steps(start):                         # range(start, max_iters), but Ctrl-C/SIGTERM
            if run.eval_due(step):                            #   end it after a whole step
                run.checkpoint(step)                          # evaluate(), log, check health, then save
            ...                                               # the training step: the method
            run.log({"iter": step + 1, "loss": ...})          # log the step, stop on a non-finite loss
        run.finish()                                          # the last checkpoint, evaluated first

Nothing broken is saved, by construction: every save, the final one and the one after a signal included,
comes after an evaluation of those very weights and a health check (runlog.Health) that they pass.
"""
import contextlib
import sys

from data import batch_indices
from machinery import UserError
from machinery.checkpoints import (OutDir, check_fingerprints, check_models, data_fingerprint, model_fingerprint,
                                   resume)
from machinery.cli import Interrupted, user_errors
from machinery.compute import init_compute
from machinery.runlog import Health, RunLog, StopSignals, check_training_loss, eval_due


class Run:
    """A training run of `stage` ("sft", "dpo", ...) into args.out_dir. experiment: the script's own flags
    that define the experiment (--resume refuses a change); models: {flag: value} of the models it starts
    from or compares with (checked before anything is written); watch: called with (step, metrics) after
    each evaluation (dpo.py's runaway warning)."""

    def __init__(self, args, stage, experiment=(), models=None, watch=None):
        self.args, self.stage, self.experiment, self.watch = args, stage, experiment, watch
        self.models = models if models is not None else {"--init": args.init}

    def __enter__(self):
        with contextlib.ExitStack() as stack:  # if any part refuses, the parts already entered are left again
            stack.enter_context(user_errors())
            self.signals = stack.enter_context(StopSignals())  # first: a SIGTERM from here on is one line
            check_models(self.models, self.args.out_dir, self.args.demo)
            self.compute = stack.enter_context(init_compute(self.args))
            self.signals.compute = self.compute
            self.out = stack.enter_context(OutDir(self.args, self.stage, self.compute, self.experiment))
            self.stack = stack.pop_all()
        return self

    def __exit__(self, exc_type, exc, traceback):
        if exc is not None and self.compute.world_size > 1 and _peer_failure(exc):
            # under torchrun a process that died or froze shows here as a failed collective, deep in backward
            first = str(exc).strip().splitlines()[0].split(". ")[0][:160]  # gloo's first sentence
            try:
                raise UserError(f"process {self.compute.rank} of {self.compute.world_size}: a collective with the "
                                f"other processes failed ({first}); one of them stopped or froze (--dist_timeout "
                                f"{self.compute.timeout:g} s): see its output. {self.out.last_saved()}") from None
            except UserError:
                return self.stack.__exit__(*sys.exc_info())
        return self.stack.__exit__(exc_type, exc, traceback)

    def start(self, model, optimizer, evaluate, held_out, data=None, examples=None, reference=None, extra=None,
              health=None):
        """Check that --batch_size fits the training examples (their number); resume (with --resume) after
        checking that the data (tokenized training pairs) and the reference ((path, model)) are what the
        run started with; set up the health check on held_out, a batch of (input_ids, labels); open
        log.jsonl. evaluate() -> {metric: value} is what each checkpoint logs; extra: {name: object with a
        state_dict} saved and resumed beside the model; health: (measure, uniform) for a model that writes no
        text (runlog.Health). Returns the step to start from. The run's first write."""
        self.evaluate, self.extra = evaluate, extra
        if examples is not None:
            batch_indices(examples, self.args.batch_size, 0, self.args.seed)  # refuses a batch larger than them
        self.model, self.optimizer = model, optimizer
        self.fingerprints = {}
        if data is not None:
            self.fingerprints["data"] = data_fingerprint(data)
        if reference is not None:
            self.fingerprints["reference"] = model_fingerprint(*reference)
        start = 0
        if self.args.resume:
            check_fingerprints(self.out.checkpoint.get("fingerprints", {}), self.fingerprints, self.args.data)
            start = resume(self.out, model, optimizer, self.compute.scaler, extra)
        self.start_step = start
        self.health = Health(held_out, self.compute, model, *(health or ()))
        model.grad_checkpoint = self.args.grad_checkpoint  # recompute each block in backward: memory for compute
        if self.args.compile:  # in place: state_dict keys stay the same
            model.compile()
            if reference is not None:
                reference[1].compile()
        print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {self.args.device}, {self.args.dtype}; effective batch "
              f"{self.args.batch_size} x {self.args.grad_accum} = {self.args.batch_size * self.args.grad_accum} "
              "examples a step")
        if self.compute.master:
            self.out.begin()
        self.log_file = RunLog(self.args.out_dir, start, write=self.compute.master)
        if self.compute.world_size > 1:
            per_process = self.args.grad_accum // self.compute.world_size
            print(f"torchrun: {self.compute.world_size} processes, {per_process} micro-batches each per step")
        return start

    def steps(self, start):
        """range(start, args.max_iters), except that Ctrl-C or SIGTERM ends it after the step in progress."""
        self.signals.catch()
        self.step = start
        while self.step < self.args.max_iters:
            yield self.step
            self.step += 1
            if self.signals.requested():
                return

    def eval_due(self, step):
        return eval_due(step, self.start_step, self.args.eval_interval)

    def log(self, record):
        """Log a training step ({"iter": ..., "loss": ..., ...}); a non-finite loss stops the run."""
        check_training_loss(record["loss"], record["iter"], self.compute.dtype, self.out.last_saved())
        self.log_file({"iter": record["iter"], "split": "train", **{k: v for k, v in record.items() if k != "iter"}})

    def checkpoint(self, step):
        """Evaluate the model as it is at `step`, log that, check its health, and only then save it. If the
        evaluation itself crashes, the weights are saved if the health check's own forward pass finds them
        healthy, and the crash goes on."""
        try:
            metrics = self.evaluate()
        except (UserError, Interrupted, KeyboardInterrupt):
            raise
        except Exception:
            print(f"the evaluation at step {step} failed; checking the weights on one held-out micro-batch "
                  "before saving them", flush=True)
            self.health.check(self.model, step, {}, self.out.last_saved())
            self._save(step)
            raise
        self.log_file({"iter": step, "split": "test", **metrics})
        if self.watch is not None:
            self.watch(step, metrics)
        self.health.check(self.model, step, metrics, self.out.last_saved())
        self._save(step)

    def _save(self, step):
        self.out.note = self.watch.note() if hasattr(self.watch, "note") else ""
        self.out.save(step, self.model, self.optimizer, self.compute.scaler, self.fingerprints, self.extra)

    def finish(self):
        """After the loop: the last steps' checkpoint, evaluated, checked and saved. True if the run is
        complete, False if a signal stopped it early (which it says)."""
        self.checkpoint(self.step)
        if self.step < self.args.max_iters:
            print(f"stopping early at step {self.step}: saved; continue with --resume", flush=True)
            return False
        if getattr(self.args, "next", None):
            print(f"next: {self.args.next}")
        return True


def _peer_failure(error):
    """Whether an exception is gloo's or NCCL's: a peer that closed its connection or never answered."""
    markers = ("gloo", "NCCL", "Connection closed by peer", "Connection reset by peer", "Timed out")
    return isinstance(error, RuntimeError) and any(marker in str(error) for marker in markers)
