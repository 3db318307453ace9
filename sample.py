"""Generate from several models side by side, and measure what DPO changed: a lab notebook in results/.

Every model gets the same prompts and, per prompt, the same random seed, so differences in the
completions come from the weights alone. For each model it reports:
- mean response length (tokens);
- KL from the reference on the model's own samples: the mean over samples of
  sum_t [log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)], the x-axis of the paper's reward/KL
  frontier (fig. 2). It estimates KL(pi || pi_ref) only for plain sampling (temperature 1, no top-k/p).
  One sample's term can be negative (that sample happens to be likelier under pi_ref); the mean over
  many samples estimates the KL, which is never negative;
- held-out preference accuracy on --data's test split: the share of pairs where log(pi / pi_ref) is
  higher for the chosen response (the implicit reward without beta, a positive factor that cannot
  change which response ranks higher, so no --beta is needed here);
- on the toy task, the oracle reward (data.toy_reward) of the samples.
Means come with their standard error over the samples ("+-" in the tables, NAME_se in the JSON).

    python sample.py --model sft=out/sft --model dpo=out/dpo --prompt $'\\n\\nHuman: Hi!\\n\\nAssistant:'
    python sample.py --demo      # sft, dpo and dpo-bad of the offline demo -> results/demo.md, demo.json
"""
import json
import os
import time

import numpy as np
import torch

from data import EOS, collate, dpo_batch, example, get_tokenizer, load_preferences, toy_reward, tokenize_pairs
from dpo import pair_logps, reward_accuracy
from model import GPT
from runs import ArgumentParser, HelpFormatter, UserError, atomic_write, check_device, pick_device, user_errors

DEMO_MODELS = ["sft=out/demo/sft", "dpo=out/demo/dpo", "dpo-bad=out/demo/dpo-bad"]
STOP_TEXT = "\n\nHuman:"  # the model starting the user's next turn: the reply is over


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--demo", action="store_true", help="compare the demo's sft, dpo and dpo-bad on toy prompts")
    p.add_argument("--model", action="append", default=[], metavar="[LABEL=]MODEL",
                   help="a checkpoint directory, Hugging Face directory or GPT-2 name; repeat for more")
    p.add_argument("--ref", help="reference model for KL and accuracy (default: the first --model)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for more")
    p.add_argument("--prompts_file", help="a text file of prompts, separated by lines that are exactly --- (default: none)")
    p.add_argument("--data", help="take prompts from this source's test split; also gives the accuracy (default: none)")
    p.add_argument("--test_split", default="test", help="the held-out split's name in --data, e.g. test_prefs")
    p.add_argument("--num_prompts", type=int, help="prompts taken from --data (default: 8; 64 with --demo)")
    p.add_argument("--max_new_tokens", type=int, help="new tokens per sample, at most (default: 128; 40 with --demo)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy; 1 samples the model's own "
                   "distribution (the KL estimate needs it)")
    p.add_argument("--top_k", type=int, help="sample from the k likeliest tokens only (default: all)")
    p.add_argument("--top_p", type=float, help="sample from the smallest set of tokens with this much "
                   "probability (default: 1, all)")
    p.add_argument("--seed", type=int, default=1337, help="prompt i is sampled with seed + i, for every model")
    p.add_argument("--device", default="auto", help="auto (cuda if there is one, else cpu), cpu, cuda, ...")
    p.add_argument("--name", help="results/NAME.md and results/NAME.json (default: a timestamp)")
    p.add_argument("--results_dir", default="results", help="where NAME.md, NAME.json and NAME.jsonl go")
    p.add_argument("--show", type=int, default=3, help="prompts printed side by side on the console")
    args = p.parse_args(argv)
    if args.demo:
        args.model = args.model or DEMO_MODELS
        args.data = args.data or "toy"
        args.num_prompts = 64 if args.num_prompts is None else args.num_prompts
        args.max_new_tokens = 40 if args.max_new_tokens is None else args.max_new_tokens
        args.device = "cpu" if args.device == "auto" else args.device
        args.name = args.name or "demo"
    args.num_prompts = 8 if args.num_prompts is None else args.num_prompts
    args.max_new_tokens = 128 if args.max_new_tokens is None else args.max_new_tokens
    if not args.model:
        p.error("give at least one --model (or --demo)")
    if not args.temperature >= 0:
        p.error(f"--temperature must not be negative, got {args.temperature}")
    for name in ("num_prompts", "max_new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.top_k is not None and args.top_k < 1 or args.top_p is not None and not 0 < args.top_p <= 1:
        p.error("--top_k must be at least 1 and --top_p in (0, 1]")
    args.models = [labelled(spec) for spec in args.model]  # [(label, path)]
    labels = [label for label, _ in args.models]
    if len(set(labels)) < len(labels):
        p.error(f"two models share a label ({', '.join(labels)}); name them as LABEL=MODEL")
    args.name = args.name or time.strftime("compare-%Y%m%d-%H%M%S")
    check_device(p, args.device)
    return args


def labelled(spec):
    """"LABEL=MODEL" -> (LABEL, MODEL); a bare MODEL is labelled by its last path component."""
    if "=" in spec:
        label, path = spec.split("=", 1)
        return label, path
    return spec.rstrip("/").split("/")[-1], spec


def read_prompts(args, held_out):
    """The prompts to sample: --prompt and --prompts_file, or else the first --num_prompts of --data."""
    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                prompts += [block.strip("\n") for block in f.read().split("\n---\n") if block.strip()]
        except OSError as e:
            raise UserError(f"cannot read --prompts_file {args.prompts_file}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise UserError(f"--prompts_file {args.prompts_file} is not UTF-8 text (byte {e.start}); save it as "
                            "UTF-8") from None
    if not prompts and held_out:
        prompts = [pair["prompt"] for pair in held_out[:args.num_prompts]]
    if not prompts:
        raise UserError("no prompts: give --prompt, --prompts_file or --data")
    return prompts


def check_writable(args):
    """Fail before sampling, not after, if the results cannot be written."""
    try:
        os.makedirs(args.results_dir, exist_ok=True)
        for extension in (".md", ".json", ".jsonl"):
            path = os.path.join(args.results_dir, args.name + extension)
            if os.path.isdir(path):
                raise IsADirectoryError(21, "a directory is in the way", path)
            with open(path + ".probe", "w"):
                pass
            os.remove(path + ".probe")
    except OSError as e:
        raise UserError(f"cannot write {os.path.join(args.results_dir, args.name)}.md ({e.strerror}); give "
                        "another --results_dir or --name") from None


def response_logp(model, prompt_ids, response_ids, device):
    """log pi(response | prompt), summed over the response tokens."""
    input_ids, labels = (t.to(device) for t in collate([example(prompt_ids, response_ids)]))
    return model(input_ids, labels).sum().item()


@torch.no_grad()
def held_out_accuracy(model, reference, pairs, device, batch_size=16):
    """Share of held-out pairs where log(pi / pi_ref), the implicit reward without beta, prefers the
    chosen response."""
    rewards = []
    for start in range(0, len(pairs), batch_size):
        batch = [t.to(device) for t in dpo_batch(pairs[start:start + batch_size])]
        chosen, rejected = pair_logps(model, batch)
        ref_chosen, ref_rejected = pair_logps(reference, batch)
        rewards.append(torch.stack([chosen - ref_chosen, rejected - ref_rejected], 1))
    rewards = torch.cat(rewards)
    return reward_accuracy(rewards[:, 0], rewards[:, 1]).item()


@torch.no_grad()
def compare(args):
    device = pick_device(args.device)
    tokenizer = get_tokenizer()
    held_out = load_preferences(args.data, "test", split_name=args.test_split) if args.data else None
    prompts = read_prompts(args, held_out)
    models = {label: GPT.from_pretrained(path, device).eval() for label, path in args.models}
    ref_label = args.ref or args.models[0][0]
    reference = models[ref_label] if ref_label in models else GPT.from_pretrained(args.ref, device).eval()
    context = min(m.config.block_size for m in [*models.values(), reference])
    if args.max_new_tokens >= context:
        raise UserError(f"--max_new_tokens {args.max_new_tokens} leaves no room for a prompt in a context of "
                        f"{context} tokens (the models' block_size); use at most {context // 2} or so")
    encoded = [tokenizer.encode_ordinary(prompt) or [EOS] for prompt in prompts]  # EOS: an empty prompt
    room = context - args.max_new_tokens
    cropped = sum(len(ids) > room for ids in encoded)
    if cropped:
        print(f"note: {cropped} of {len(prompts)} prompts are longer than the {room} tokens that "
              f"--max_new_tokens {args.max_new_tokens} leaves of {context}: each keeps its last {room}")
    encoded = [ids[-room:] for ids in encoded]  # the end of a conversation is what the reply answers
    pairs = None
    if held_out:
        pairs = tokenize_pairs(held_out[:256], 512, 256, tokenizer, verbose=False)
        pairs = [p for p in pairs if len(p["prompt"]) + max(len(p["chosen"]), len(p["rejected"])) <= context]

    def stop(new_ids):
        return STOP_TEXT in tokenizer.decode(new_ids[-4:])

    samples = {label: [] for label in models}
    summary = {}
    for label, model in models.items():
        lengths, kls, rewards = [], [], []
        for i, prompt in enumerate(prompts):
            prompt_ids = encoded[i]
            generator = torch.Generator(device=device).manual_seed(args.seed + i)  # same seed per prompt
            out = model.generate(torch.tensor([prompt_ids], device=device), args.max_new_tokens,
                                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                 generator=generator, stop=stop)
            new_ids = out[0, len(prompt_ids):].tolist()
            text = tokenizer.decode([t for t in new_ids if t != EOS])
            text = text.split(STOP_TEXT)[0]
            kl = response_logp(model, prompt_ids, new_ids, device) - response_logp(reference, prompt_ids, new_ids, device)
            lengths.append(len(new_ids))
            kls.append(kl)
            record = {"prompt": prompt, "completion": text, "tokens": len(new_ids), "kl": kl}
            if args.data == "toy":
                record["reward"] = toy_reward(text)
                rewards.append(record["reward"])
            samples[label].append(record)
        summary[label] = {"mean_length": float(np.mean(lengths)), **mean_and_error("kl", kls)}
        if rewards:
            summary[label].update(mean_and_error("oracle_reward", rewards))
        if pairs:
            summary[label]["accuracy"] = held_out_accuracy(model, reference, pairs, device)
    return prompts, samples, summary, ref_label


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


def write_results(args, prompts, samples, summary, ref_label):
    """NAME.json (settings, summary, every sample), NAME.jsonl (a sample a line) and NAME.md, each written
    whole or not at all."""
    settings = {k: getattr(args, k) for k in ("model", "data", "temperature", "top_k", "top_p", "max_new_tokens", "seed")}
    record = {"settings": settings, "reference": ref_label, "summary": summary, "samples": samples}
    lines = [f"# {args.name}", "", f"`python sample.py {' '.join(f'--model {m}' for m in args.model)}"
             f"{' --data ' + args.data if args.data else ''}`, temperature {args.temperature}, "
             f"{len(prompts)} prompts, seed {args.seed}; KL and accuracy against `{ref_label}`; +- is one "
             "standard error over the samples.", "", table(summary), ""]
    for i, prompt in enumerate(prompts):
        lines += [f"## Prompt {i + 1}", "", "```", prompt.strip(), "```", ""]
        lines += [f"- **{label}**: {rows[i]['completion'].strip()!r}" for label, rows in samples.items()] + [""]
    texts = {".json": json.dumps(record, indent=1),
             ".jsonl": "".join(json.dumps({"model": label, **row}) + "\n" for label, rows in samples.items()
                               for row in rows),
             ".md": "\n".join(lines)}
    for extension, text in texts.items():
        atomic_write(os.path.join(args.results_dir, args.name + extension), lambda path: write_text(path, text))


def write_text(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def table(summary):
    """The summary as a markdown table; means with a standard error show it as "mean +- error"."""
    columns = ["mean_length", "kl", "oracle_reward", "accuracy"]
    columns = [c for c in columns if any(c in row for row in summary.values())]
    rows = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, row in summary.items():
        cells = []
        for c in columns:
            cell = f"{row[c]:.3f}" if c in row else ""
            if c + "_se" in row:
                cell += f" +- {row[c + '_se']:.3f}"
            cells.append(cell)
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None):
    args = parse_args(argv)
    with user_errors():
        check_writable(args)
        prompts, samples, summary, ref_label = compare(args)
        write_results(args, prompts, samples, summary, ref_label)
    for i in range(min(args.show, len(prompts))):
        print(f"\n=== prompt {i + 1}: {prompts[i].strip()[-120:]!r}")
        for label, rows in samples.items():
            print(f"--- {label}: {rows[i]['completion'].strip()!r}")
    print("\n" + table(summary))
    print(f"\nwrote {args.results_dir}/{args.name}.md, .json and .jsonl")


if __name__ == "__main__":
    main()
