"""Generate from several models side by side, and measure what DPO changed: a lab notebook in results/.

Every model gets the same prompts and, per prompt, the same random seed, so differences in the
completions come from the weights alone. For each model it reports:
- mean response length (tokens);
- KL from the reference on the model's own samples: the mean over samples of
  sum_t [log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)], the x-axis of the paper's reward/KL
  frontier (fig. 2). It estimates KL(pi || pi_ref) only for plain sampling (temperature 1, no top-k/p);
- held-out preference accuracy of the implicit reward beta log(pi / pi_ref) on --data's test split;
- on the toy task, the oracle reward (data.toy_reward) of the samples.

    python sample.py --model sft=out/sft --model dpo=out/dpo --prompt $'\\n\\nHuman: Hi!\\n\\nAssistant:'
    python sample.py --demo      # sft, dpo and dpo-bad of the offline demo -> results/demo.md, demo.json
"""
import argparse
import json
import os
import time

import torch

from data import EOS, collate, dpo_batch, example, get_tokenizer, load_preferences, toy_reward, tokenize_pairs
from dpo import pair_logps, reward_accuracy
from model import GPT
from runs import HelpFormatter, UserError, pick_device, user_errors

DEMO_MODELS = ["sft=out/demo/sft", "dpo=out/demo/dpo", "dpo-bad=out/demo/dpo-bad"]
STOP_TEXT = "\n\nHuman:"  # the model starting the user's next turn: the reply is over


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
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
        args.num_prompts = args.num_prompts or 64
        args.max_new_tokens = args.max_new_tokens or 40
        args.device = "cpu" if args.device == "auto" else args.device
        args.name = args.name or "demo"
    args.num_prompts = args.num_prompts or 8
    args.max_new_tokens = args.max_new_tokens or 128
    if not args.model:
        p.error("give at least one --model (or --demo)")
    if args.temperature < 0 or args.num_prompts < 1 or args.max_new_tokens < 1:
        p.error("--temperature must be >= 0, --num_prompts and --max_new_tokens at least 1")
    if args.top_k is not None and args.top_k < 1 or args.top_p is not None and not 0 < args.top_p <= 1:
        p.error("--top_k must be at least 1 and --top_p in (0, 1]")
    args.models = [labelled(spec) for spec in args.model]  # [(label, path)]
    labels = [label for label, _ in args.models]
    if len(set(labels)) < len(labels):
        p.error(f"two models share a label ({', '.join(labels)}); name them as LABEL=MODEL")
    args.name = args.name or time.strftime("compare-%Y%m%d-%H%M%S")
    return args


def labelled(spec):
    """"LABEL=MODEL" -> (LABEL, MODEL); a bare MODEL is labelled by its last path component."""
    if "=" in spec:
        label, path = spec.split("=", 1)
        return label, path
    return spec.rstrip("/").split("/")[-1], spec


def read_prompts(args):
    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            with open(args.prompts_file) as f:
                prompts += [block.strip("\n") for block in f.read().split("\n---\n") if block.strip()]
        except OSError as e:
            raise UserError(f"cannot read --prompts_file {args.prompts_file}: {e.strerror}") from None
    if not prompts and args.data:
        prompts = [p["prompt"] for p in load_preferences(args.data, "test", split_name=args.test_split)[:args.num_prompts]]
    if not prompts:
        raise UserError("no prompts: give --prompt, --prompts_file or --data")
    return prompts


def response_logp(model, prompt_ids, response_ids, device):
    """log pi(response | prompt), summed over the response tokens."""
    input_ids, labels = (t.to(device) for t in collate([example(prompt_ids, response_ids)]))
    return model(input_ids, labels).sum().item()


@torch.no_grad()
def held_out_accuracy(model, reference, pairs, device, batch_size=16):
    """Share of held-out pairs where the implicit reward log(pi / pi_ref) prefers the chosen response."""
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
    models = {label: GPT.from_pretrained(path, device).eval() for label, path in args.models}
    ref_label = args.ref or args.models[0][0]
    reference = models[ref_label] if ref_label in models else GPT.from_pretrained(args.ref, device).eval()
    prompts = read_prompts(args)
    pairs = None
    if args.data:
        pairs = tokenize_pairs(load_preferences(args.data, "test", verbose=False, split_name=args.test_split)[:256], 512, 256,
                               tokenizer, verbose=False)
        context = min(m.config.block_size for m in models.values())
        pairs = [p for p in pairs if len(p["prompt"]) + max(len(p["chosen"]), len(p["rejected"])) <= context]

    def stop(new_ids):
        return STOP_TEXT in tokenizer.decode(new_ids[-4:])

    samples = {label: [] for label in models}
    summary = {}
    for label, model in models.items():
        lengths, kls, rewards = [], [], []
        for i, prompt in enumerate(prompts):
            # keep the prompt's end, and room for at least one new token (EOS stands in for an empty prompt)
            room = max(1, model.config.block_size - args.max_new_tokens)
            prompt_ids = (tokenizer.encode_ordinary(prompt) or [EOS])[-room:]
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
        summary[label] = {"mean_length": sum(lengths) / len(lengths), "kl": sum(kls) / len(kls)}
        if rewards:
            summary[label]["oracle_reward"] = sum(rewards) / len(rewards)
        if pairs:
            summary[label]["accuracy"] = held_out_accuracy(model, reference, pairs, device)
    return prompts, samples, summary, ref_label


def write_results(args, prompts, samples, summary, ref_label):
    os.makedirs(args.results_dir, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("model", "data", "temperature", "top_k", "top_p", "max_new_tokens", "seed")}
    record = {"settings": settings, "reference": ref_label, "summary": summary, "samples": samples}
    with open(os.path.join(args.results_dir, args.name + ".json"), "w") as f:
        json.dump(record, f, indent=1)
    with open(os.path.join(args.results_dir, args.name + ".jsonl"), "w") as f:
        for label, rows in samples.items():
            for row in rows:
                f.write(json.dumps({"model": label, **row}) + "\n")
    lines = [f"# {args.name}", "", f"`python sample.py {' '.join(f'--model {m}' for m in args.model)}"
             f"{' --data ' + args.data if args.data else ''}`, temperature {args.temperature}, "
             f"{len(prompts)} prompts, seed {args.seed}; KL and accuracy against `{ref_label}`.", "",
             table(summary), ""]
    for i, prompt in enumerate(prompts):
        lines += [f"## Prompt {i + 1}", "", "```", prompt.strip(), "```", ""]
        lines += [f"- **{label}**: {rows[i]['completion'].strip()!r}" for label, rows in samples.items()] + [""]
    with open(os.path.join(args.results_dir, args.name + ".md"), "w") as f:
        f.write("\n".join(lines))


def table(summary):
    columns = ["mean_length", "kl", "oracle_reward", "accuracy"]
    columns = [c for c in columns if any(c in row for row in summary.values())]
    rows = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, row in summary.items():
        rows.append(f"| {label} | " + " | ".join(f"{row[c]:.3f}" if c in row else "" for c in columns) + " |")
    return "\n".join(rows)


def main(argv=None):
    args = parse_args(argv)
    with user_errors():
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
