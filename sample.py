"""Samples from several models side by side, and what DPO changed. Every model gets the same prompts and, per
prompt, the same seed, so the completions differ by the weights alone; means come with their standard error.
KL from the reference: the mean over the model's own samples y ~ pi (temperature 1) of sum_t [log pi(y_t | ..)
- log pi_ref(y_t | ..)], the x-axis of the paper's fig. 2 (of replies cut at --max_new_tokens or the next
"Human:": a lower bound). Held-out accuracy: the share of test pairs whose chosen reply has the higher log(pi /
pi_ref). The oracle reward is data.toy_reward.

    python sample.py --demo        # every run in out/demo, side by side -> out/demo/samples.md and .json
    python sample.py --model sft=out/sft --model dpo=out/dpo --data Anthropic/hh-rlhf
"""
import torch

from data import EOS, HUMAN, collate, get_tokenizer, inputs_and_labels, load_preferences, toy_reward
from machinery import results
from machinery.models import open_model
from machinery.cli import ArgumentParser, HelpFormatter, at_least, description, fraction, not_negative, user_errors

def parse_args(argv=None):
    p = ArgumentParser(description=description(__doc__), formatter_class=HelpFormatter)
    p.add_argument("--demo", action="store_true", help="every run in out/demo, sft first (the reference), on toy prompts")
    p.add_argument("--model", action="append", default=[], metavar="[LABEL=]MODEL", help="a checkpoint or "
                   "Hugging Face directory, or a GPT-2 name; repeat for more (default: with --demo, out/demo/*)")
    p.add_argument("--ref", help="the reference for KL and accuracy (default: the first --model)")
    p.add_argument("--data", help="prompts from this source's test split, and accuracy (default: toy with --demo)")
    p.add_argument("--temperature", type=not_negative, default=1.0, help="0 is greedy; the KL needs 1")
    p.add_argument("--top_k", type=at_least(1), help="sample from the k likeliest tokens only (default: all)")
    p.add_argument("--top_p", type=fraction(0, 1, True), help="sample from the likeliest tokens that make up this "
                   "much probability (default: 1, all)")
    p.add_argument("--seed", type=int, default=1337, help="prompt i is sampled with seed + i, for every model")
    results.add_io_flags(p)  # --num_prompts, --max_new_tokens, --test_split, --prompt(s_file), --device, --results_dir, ...
    return results.checked(p, p.parse_args(argv))


@torch.no_grad()
def complete(model, prompts, tokenizer, generators, max_new_tokens, temperature=1.0, top_k=None, top_p=None):
    """A reply to each prompt (token ids), a generator a row: (new tokens, the text up to the next "Human:")."""
    new = model.generate(prompts, max_new_tokens, temperature, top_k, top_p, generators,
                         stop=lambda new_ids: HUMAN in tokenizer.decode(new_ids[-4:]))
    return new, [tokenizer.decode([t for t in ids if t != EOS]).split(HUMAN)[0] for ids in new]


@torch.no_grad()
def response_logps(model, prompts, responses, device, batch_size=64):
    """log pi(response | prompt) of each pair, summed over the response tokens."""
    logps = []
    for start in range(0, len(prompts), batch_size):
        rows = zip(prompts[start:start + batch_size], responses[start:start + batch_size])
        input_ids, labels = (t.to(device) for t in collate([inputs_and_labels(p, r) for p, r in rows]))
        logps += model(input_ids, labels).sum(-1).tolist()
    return logps


def held_out_logps(model, pairs, device):
    """(N, 2): log pi of every held-out pair's chosen and rejected reply."""
    prompts = [pair["prompt"] for pair in pairs]
    return torch.tensor([response_logps(model, prompts, [p[reply] for p in pairs], device)
                         for reply in ("chosen", "rejected")]).T


@torch.no_grad()
def compare(args):
    tokenizer = get_tokenizer()
    held_out = load_preferences(args.data, "test", split_name=args.test_split) if args.data else None
    models = {label: open_model(path).to(args.device).eval() for label, path in args.models}
    reference = models[args.ref] if args.ref in models else open_model(args.ref).to(args.device).eval()
    prompts, encoded = results.prompts(args, held_out, tokenizer, [*models.values(), reference])
    pairs = results.accuracy_pairs(held_out, tokenizer, reference.config.block_size)  # up to 256, as tokens
    reference_logps = held_out_logps(reference, pairs, args.device) if pairs else None

    samples, summary = {}, {}
    for label, model in models.items():
        # all prompts at once, each with its own seed, so the batch changes no sample
        generators = [torch.Generator(device=args.device).manual_seed(args.seed + i) for i in range(len(encoded))]
        new, texts = complete(model, encoded, tokenizer, generators, args.max_new_tokens, args.temperature,
                              args.top_k, args.top_p)
        # KL: log pi(y) - log pi_ref(y) on the model's own samples, every sampled token (a "Human:" stop included)
        kls = [a - b for a, b in zip(response_logps(model, encoded, new, args.device),
                                     response_logps(reference, encoded, new, args.device))]
        samples[label] = [{"prompt": prompt, "completion": text, "tokens": len(ids), "kl": kl}
                          for prompt, text, ids, kl in zip(prompts, texts, new, kls)]
        summary[label] = {"mean_length": sum(map(len, new)) / len(new), **results.mean_and_error("kl", kls)}
        if args.data == "toy":  # the oracle: the true reward, which real preference data does not have
            for row in samples[label]:
                row["reward"] = toy_reward(row["prompt"], row["completion"])
            summary[label].update(results.mean_and_error("oracle_reward", [row["reward"] for row in samples[label]]))
        if pairs:  # the implicit reward without beta, log(pi / pi_ref), should rank the chosen reply higher
            chosen, rejected = (held_out_logps(model, pairs, args.device) - reference_logps).unbind(1)
            # a tie counts half, so the reference itself reads 0.5 (as in dpo.micro_batch)
            summary[label]["accuracy"] = ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean().item()
    return prompts, samples, summary


def main(argv=None):
    args = parse_args(argv)
    with user_errors():
        results.check_writable(args.results_dir, args.name)
        prompts, samples, summary = compare(args)
        results.write(args, argv, prompts, samples, summary)
    results.show(args, prompts, samples, summary)


if __name__ == "__main__":
    main()
