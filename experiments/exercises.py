"""The README's exercises, "break it and watch": each a one-line edit of the lesson (or a flag), and its
symptom on the toy task, measured here at the demo's scale. tests/test_exercises.py makes each break again
at a smaller scale and asserts the same symptom, so an exercise cannot drift from the code; the README's
diffs are made from EXERCISES by experiments/tables.py.

    python -m experiments.exercises          # every measurement -> results/exercises.json
"""
import contextlib
import inspect
import io
import json
import math
import os
import shutil
import tokenize

import torch

import data
import dpo
import sample
import sft
from data import collate, get_tokenizer, load_preferences
from machinery.models import open_model
from machinery.results import machine, mean_and_sem

OUT = "out/exercises"
HH_EXCERPT = "examples/hh-rlhf-harmless-base"

# name: (module, function, the line's code as it is, the code broken). A line is matched by its code alone:
# its comment, and the indentation, may change without breaking the exercise.
EXERCISES = {
    "mean": (dpo, "pair_logps",
             "logps = model(*batch).sum(dim=-1).view(2, -1)",
             "logps = (model(*batch).sum(dim=-1) / (batch[1] != -100).sum(dim=-1)).view(2, -1)  # a mean"),
    "moving-reference": (dpo, "micro_batch",
                         "ref_chosen, ref_rejected = pair_logps(reference, batch)",
                         "ref_chosen, ref_rejected = pair_logps(policy, batch)"),
    "no-prompt-mask": (data, "inputs_and_labels",
                       "labels = [IGNORE_INDEX] * (len(prompt) - 1) + response",
                       "labels = tokens[1:]"),
    "no-eos": (data, "tokenize_pairs",
               "chosen, rejected = chosen + [EOS], rejected + [EOS]",
               "chosen, rejected = chosen, rejected"),
    "per-micro-batch-mean": (sft, "train",
                             "loss = sft_loss(ddp_model, input_ids, labels, n_tokens)",
                             "loss = sft_loss(ddp_model, input_ids, labels, (labels != IGNORE_INDEX).sum() * len(mine))"),
}


def code_lines(source):
    """Each line of source without its comment or trailing spaces."""
    lines = source.split("\n")
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            row, column = token.start
            lines[row - 1] = lines[row - 1][:column]
    return [line.rstrip() for line in lines]


def located(name):
    """(module, function, its source, the index of the exercise's line in it), refusing unless that code stands
    on exactly one line of the function."""
    module, function, code, _ = EXERCISES[name]
    source = inspect.getsource(getattr(module, function))
    found = [i for i, line in enumerate(code_lines(source)) if line.strip() == code]
    assert len(found) == 1, f"exercise {name}: `{code}` is on {len(found)} lines of {module.__name__}.{function}, not 1"
    return module, function, source, found[0]


@contextlib.contextmanager
def broken(name):
    """The lesson with exercise `name`'s edit made: its function recompiled from the edited source, in its
    module, for as long as the block runs."""
    module, function, source, index = located(name)
    lines = source.split("\n")
    indent = lines[index][:len(lines[index]) - len(lines[index].lstrip())]
    lines[index] = indent + EXERCISES[name][3]
    namespace = {}
    exec(compile("\n".join(lines), module.__file__, "exec"), module.__dict__, namespace)
    original = getattr(module, function)
    setattr(module, function, namespace[function])
    try:
        yield
    finally:
        setattr(module, function, original)


def diff(name):
    """The exercise's edit as a diff of one line, for the README: the code, without the line's comment."""
    module, function, source, index = located(name)
    line = code_lines(source)[index]
    indent = line[:len(line) - len(line.lstrip())]
    return f"--- {module.__name__}.py ({function})\n-{line}\n+{indent}{EXERCISES[name][3]}"


def last(out_dir, split, key):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line)[key] for line in f if json.loads(line)["split"] == split][-1]


def samples_of(models, name):
    sample.main(["--demo"] + [f"--model={label}={path}" for label, path in models] +
                ["--num_prompts", "200", "--results_dir", OUT, "--name", name, "--show", "0"])
    with open(os.path.join(OUT, name + ".json")) as f:
        return json.load(f)["summary"]


def fresh(path):
    shutil.rmtree(path, ignore_errors=True)
    return path


def main():
    os.makedirs(OUT, exist_ok=True)
    results = {}
    base = fresh(f"{OUT}/sft")
    sft.main(["--demo", "--out_dir", base, "--eval_batches", "4"])
    dpo_flags = ["--demo", "--init", base, "--eval_batches", "4"]
    # 1. a mean over the reply's tokens instead of the sum
    dpo.main(dpo_flags + ["--out_dir", fresh(f"{OUT}/dpo")])
    with broken("mean"):
        dpo.main(dpo_flags + ["--out_dir", fresh(f"{OUT}/dpo-mean")])
    summary = samples_of([("sft", base), ("sum", f"{OUT}/dpo"), ("mean", f"{OUT}/dpo-mean")], "mean")
    results["mean"] = {label: {"loss": last(f"{OUT}/dpo{suffix}", "test", "loss"),
                               "margin": last(f"{OUT}/dpo{suffix}", "test", "rewards/margin"),
                               "reward": summary[label]["oracle_reward"], "kl": summary[label]["kl"]}
                       for label, suffix in (("sum", ""), ("mean", "-mean"))}
    # 2. the reference moving with the policy
    with broken("moving-reference"):
        dpo.main(dpo_flags + ["--out_dir", fresh(f"{OUT}/dpo-moving")])
    summary = samples_of([("sft", base), ("moving", f"{OUT}/dpo-moving")], "moving")
    with open(f"{OUT}/dpo-moving/log.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f if json.loads(line)["split"] == "test"]
    results["moving-reference"] = {"losses": losses, "kl": summary["moving"]["kl"],
                                   "reward": summary["moving"]["oracle_reward"]}
    # 3. no prompt mask: DPO does not notice, SFT learns to write prompts
    with broken("no-prompt-mask"):
        dpo.main(dpo_flags + ["--out_dir", fresh(f"{OUT}/dpo-no-mask")])
        sft.main(["--demo", "--out_dir", fresh(f"{OUT}/sft-no-mask"), "--eval_batches", "4"])
    results["no-prompt-mask"] = {"dpo_loss": last(f"{OUT}/dpo-no-mask", "test", "loss"),
                                 "dpo_loss_masked": last(f"{OUT}/dpo", "test", "loss"),
                                 "prompt_nll": prompt_nll(f"{OUT}/sft-no-mask"), "prompt_nll_masked": prompt_nll(base)}
    # 4. no EOS: the replies never end
    with broken("no-eos"):
        sft.main(["--demo", "--out_dir", fresh(f"{OUT}/sft-no-eos"), "--eval_batches", "4"])
    summary = samples_of([("sft", base), ("no-eos", f"{OUT}/sft-no-eos")], "no-eos")
    results["no-eos"] = {"length": summary["no-eos"]["mean_length"], "length_with_eos": summary["sft"]["mean_length"],
                         "max_new_tokens": 40}
    # 5. each micro-batch's own mean in SFT's gradient accumulation: the first step's gradient norm, on the toy
    # replies (nearly all one length) and on the shipped HH excerpt's (whose lengths differ a lot)
    norms = {}
    for data_name, data_flags in (("toy", []), ("HH", ["--data", HH_EXCERPT, "--max_len", "128"])):
        for label, flags in (("one batch", ["--batch_size", "32", "--grad_accum", "1"]),
                             ("4 micro-batches", ["--batch_size", "8", "--grad_accum", "4"])):
            for broken_name in (None, "per-micro-batch-mean"):
                out_dir = fresh(f"{OUT}/accumulation")
                with broken(broken_name) if broken_name else contextlib.nullcontext():
                    sft.main(["--demo", "--max_iters", "1", "--eval_interval", "0", "--eval_batches", "1", "--out_dir",
                              out_dir] + flags + data_flags)
                norms[f"{data_name}: {label}{' (broken)' if broken_name else ''}"] = last(out_dir, "train", "grad_norm")
    results["per-micro-batch-mean"] = norms
    # 6. a learning rate ten times the demo's
    lr = dpo.DEMO["lr"] * 10
    dpo.main(dpo_flags + ["--lr", str(lr), "--out_dir", fresh(f"{OUT}/dpo-lr")])
    summary = samples_of([("sft", base), ("lr", f"{OUT}/dpo-lr")], "lr")
    with open(f"{OUT}/dpo-lr/log.jsonl") as f:
        chosen = [json.loads(line)["logps/chosen"] for line in f if json.loads(line)["split"] == "test"]
    results["high-lr"] = {"lr": lr, "logps_chosen": chosen, "kl": summary["lr"]["kl"],
                          "reward": summary["lr"]["oracle_reward"]}
    results["machine"] = machine()
    with open("results/exercises.json", "w") as f:
        json.dump(results, f, indent=1)
    print("wrote results/exercises.json")


def prompt_nll(model_dir):
    """Nats per token an SFT model gives the held-out prompts: what it learned of writing them."""
    tokenizer = get_tokenizer()
    model = open_model(model_dir).eval()
    prompts = [tokenizer.encode_ordinary(p["prompt"]) for p in load_preferences("toy", "test")]
    input_ids, labels = collate([(ids[:-1], ids[1:]) for ids in prompts])
    with torch.no_grad():
        return -model(input_ids, labels).sum().item() / (labels != -100).sum().item()


if __name__ == "__main__":
    main()
