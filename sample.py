"""Samples from several models side by side, and what DPO changed: KL from the reference, oracle reward,
held-out accuracy.

Every model gets the same prompts and, per prompt, the same random seed, so differences between the
completions come from the weights alone. For each model it reports:
- mean response length, in tokens;
- KL from the reference on the model's own samples: the mean over samples y ~ pi of
  sum_t [log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)], the x-axis of the paper's reward/KL frontier
  (its fig. 2). It estimates KL(pi || pi_ref) for plain sampling only (temperature 1, no top-k or top-p),
  and of the samples as cut (at --max_new_tokens or the next "Human:" turn): a lower bound on the KL of
  whole replies. One sample's term can be negative; their mean estimates a KL, which never is;
- held-out accuracy on --data's test split: the share of pairs whose chosen reply has the higher
  log(pi / pi_ref), the implicit reward without beta (a positive factor, which cannot change the order);
- on the toy task, the oracle reward (data.toy_reward) of the samples.
Means come with their standard error over the samples ("+-" in the tables, NAME_se in the JSON).

    python sample.py --model sft=out/sft --model dpo=out/dpo --prompt $'\\n\\nHuman: Hi!\\n\\nAssistant:'
    python sample.py --demo      # the demo's sft, dpo and dpo-bad -> results/demo.md, demo.json
"""
import sys

import numpy as np
import torch

from data import EOS, collate, dpo_batch, get_tokenizer, inputs_and_labels, load_preferences, toy_reward, tokenize_pairs
from dpo import pair_logps, reward_accuracy
from machinery import UserError
from machinery.checkpoints import open_model
from machinery.cli import ArgumentParser, HelpFormatter, at_least, description, fraction, not_negative, user_errors
from machinery.compute import pick_device
from machinery.results import (check_writable, labelled, mean_and_error, read_prompts_file, table,
                               write_results)

DEMO_MODELS = ["sft=out/demo/sft", "dpo=out/demo/dpo", "dpo-bad=out/demo/dpo-bad"]
STOP_TEXT = "\n\nHuman:"  # the model starting the user's next turn: the reply is over


def parse_args(argv=None):
    p = ArgumentParser(description=description(__doc__), formatter_class=HelpFormatter)
    p.add_argument("--demo", action="store_true", help="compare the demo's sft, dpo and dpo-bad on toy prompts")
    p.add_argument("--model", action="append", default=[], metavar="[LABEL=]MODEL",
                   help="a checkpoint directory, Hugging Face directory or GPT-2 name; repeat for more (default: none; "
                   "with --demo, the demo's sft, dpo and dpo-bad)")
    p.add_argument("--ref", help="reference model for KL and accuracy (default: the first --model)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for more (default: none)")
    p.add_argument("--prompts_file", help="a text file of prompts, separated by lines that are exactly --- "
                   "(default: none)")
    p.add_argument("--data", help="take prompts from this source's test split; also gives the accuracy "
                   "(default: none; toy with --demo)")
    p.add_argument("--test_split", default="test", help="the held-out split's name in --data, e.g. test_prefs")
    p.add_argument("--num_prompts", type=at_least(1), help="prompts taken from --data (default: 8; 64 with --demo)")
    p.add_argument("--max_new_tokens", type=at_least(1), help="new tokens per sample, at most (default: 128; 40 "
                   "with --demo)")
    p.add_argument("--temperature", type=not_negative, default=1.0, help="0 is greedy; 1 samples the model's own "
                   "distribution (the KL estimate needs it)")
    p.add_argument("--top_k", type=at_least(1), help="sample from the k likeliest tokens only (default: all)")
    p.add_argument("--top_p", type=fraction(0, 1, high_included=True), help="sample from the smallest set of "
                   "tokens with this much probability (default: 1, all)")
    p.add_argument("--seed", type=int, default=1337, help="prompt i is sampled with seed + i, for every model")
    p.add_argument("--device", default="auto", help="auto (cuda if there is one, else cpu), cpu, cuda, ...")
    p.add_argument("--name", help="the results' file names, NAME.md, NAME.json and NAME.jsonl (default: demo "
                   "with --demo, else compare-DATE-TIME)")
    p.add_argument("--results_dir", default="results", help="where NAME.md, NAME.json and NAME.jsonl go")
    p.add_argument("--show", type=at_least(0), default=3, help="prompts printed side by side on the console")
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
    if args.top_p == 0:
        p.error("argument --top_p: must be in (0, 1], got 0")
    if not args.model:
        p.error("give at least one --model (or --demo)")
    args.models = [labelled(spec) for spec in args.model]  # [(label, path)]
    labels = [label for label, _ in args.models]
    if len(set(labels)) < len(labels):
        p.error(f"two models share a label ({', '.join(labels)}); name them as LABEL=MODEL")
    if args.name is None:
        import time
        args.name = time.strftime("compare-%Y%m%d-%H%M%S")
    try:
        pick_device(args.device)
    except UserError as e:
        p.error(str(e))
    return args


def response_logp(model, prompt_ids, response_ids, device):
    """log pi(response | prompt), summed over the response tokens."""
    input_ids, labels = (t.to(device) for t in collate([inputs_and_labels(prompt_ids, response_ids)]))
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
    prompts = list(args.prompt) + (read_prompts_file(args.prompts_file) if args.prompts_file else [])
    if not prompts and held_out:
        prompts = [pair["prompt"] for pair in held_out[:args.num_prompts]]
    if not prompts:
        raise UserError("no prompts: give --prompt, --prompts_file or --data")
    models = {label: open_model(path).to(device).eval() for label, path in args.models}
    ref_label = args.ref or args.models[0][0]
    reference = models[ref_label] if ref_label in models else open_model(args.ref).to(device).eval()
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

    samples, summary = {label: [] for label in models}, {}
    for label, model in models.items():
        lengths, kls, rewards = [], [], []
        for i, prompt_ids in enumerate(encoded):
            generator = torch.Generator(device=device).manual_seed(args.seed + i)  # the same seed per prompt
            new_ids = model.generate([prompt_ids], args.max_new_tokens, temperature=args.temperature,
                                     top_k=args.top_k, top_p=args.top_p, generators=[generator], stop=stop)[0]
            text = tokenizer.decode([t for t in new_ids if t != EOS]).split(STOP_TEXT)[0]
            kl = response_logp(model, prompt_ids, new_ids, device) - response_logp(reference, prompt_ids, new_ids, device)
            lengths.append(len(new_ids))
            kls.append(kl)
            record = {"prompt": prompts[i], "completion": text, "tokens": len(new_ids), "kl": kl}
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


def main(argv=None):
    args = parse_args(argv)
    with user_errors():
        check_writable(args.results_dir, args.name)
        prompts, samples, summary, ref_label = compare(args)
        settings = {k: getattr(args, k) for k in ("model", "data", "temperature", "top_k", "top_p", "max_new_tokens",
                                                   "seed")}
        markdown = [f"Temperature {args.temperature}, {len(prompts)} prompts, seed {args.seed}; KL and accuracy "
                    f"against `{ref_label}`; +- is one standard error over the samples.", "", table(summary), ""]
        for i, prompt in enumerate(prompts):
            markdown += [f"## Prompt {i + 1}", "", "```", prompt.strip(), "```", ""]
            markdown += [f"- **{label}**: {rows[i]['completion'].strip()!r}" for label, rows in samples.items()] + [""]
        command = "python sample.py " + " ".join(sys.argv[1:] if argv is None else argv)
        write_results(args.results_dir, args.name, command.strip(),
                      {"settings": settings, "reference": ref_label, "summary": summary, "samples": samples}, markdown)
    for i in range(min(args.show, len(prompts))):
        print(f"\n=== prompt {i + 1}: {prompts[i].strip()[-120:]!r}")
        for label, rows in samples.items():
            print(f"--- {label}: {rows[i]['completion'].strip()!r}")
    print("\n" + table(summary))
    print(f"\nwrote {args.results_dir}/{args.name}.md, .json and .jsonl")


if __name__ == "__main__":
    main()
