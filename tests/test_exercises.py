"""The README's exercises, each broken again at a small scale with its symptom asserted: an exercise cannot
drift from the code (experiments/exercises.py refuses an edit whose line is gone), and the README shows each
edit as experiments/tables.py makes it from the same definition."""
import math
import os

import pytest

import dpo
import sft
from conftest import HH_TEST, ROOT, SMALL, read_log
from experiments.exercises import EXERCISES, broken, diff, prompt_nll


def dpo_run(toy_models, out_dir, *extra):
    dpo.main(["--demo", "--init", toy_models["sft"], "--batch_size", "8", "--eval_batches", "2", "--lr", "1e-4",
              "--out_dir", str(out_dir)] + list(extra))
    return read_log(out_dir, "test")


def test_every_exercise_applies_to_todays_code_and_the_readme_shows_it():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    for name in EXERCISES:
        with broken(name):  # refuses if the line it edits is gone
            pass
        assert diff(name) in readme, name


def test_a_mean_over_tokens_leaves_the_loss_near_ln2(toy_models, tmp_path):
    summed = dpo_run(toy_models, tmp_path / "sum", "--max_iters", "12", "--eval_interval", "12")
    with broken("mean"):
        mean = dpo_run(toy_models, tmp_path / "mean", "--max_iters", "12", "--eval_interval", "12")
    # a mean is about |y| = 21 times smaller than a sum: beta h stays tiny, and so does the loss's fall from ln 2
    summed_drop, mean_drop = (math.log(2) - run[-1]["loss"] for run in (summed, mean))
    assert 0 < mean_drop < summed_drop / 5, (summed[-1], mean[-1])
    assert abs(mean[-1]["rewards/margin"]) < abs(summed[-1]["rewards/margin"]) / 10


def test_a_reference_that_moves_with_the_policy_keeps_the_loss_at_ln2_while_the_policy_moves(toy_models, tmp_path):
    with broken("moving-reference"):
        evals = dpo_run(toy_models, tmp_path, "--max_iters", "6", "--eval_interval", "3")
    assert all(e["loss"] == pytest.approx(math.log(2), abs=1e-6) for e in evals)  # h = 0 at every evaluation
    assert all(e["rewards/margin"] == 0 for e in evals)
    assert evals[-1]["logps/chosen"] != pytest.approx(evals[0]["logps/chosen"], abs=1e-3)  # yet the policy moved


def small_sft(pairs_file, out_dir):
    sft.main(["--init", "scratch", "--data", pairs_file, "--max_iters", "30", "--lr", "3e-3", "--warmup", "3",
              "--eval_interval", "0", "--out_dir", str(out_dir)] + SMALL)
    return str(out_dir)


@pytest.fixture(scope="module")
def unbroken_sft(pairs_file, tmp_path_factory):
    """A small SFT run of the lesson as it is: what exercises 3 and 4 compare their broken runs with."""
    return small_sft(pairs_file, tmp_path_factory.mktemp("unbroken") / "sft")


def test_no_prompt_mask_changes_nothing_in_dpo_but_sft_learns_the_prompts(toy_models, pairs_file, unbroken_sft,
                                                                           tmp_path):
    masked = dpo_run(toy_models, tmp_path / "masked", "--max_iters", "1", "--eval_interval", "1")
    with broken("no-prompt-mask"):  # one step: the same loss after it means the same gradient and update
        unmasked = dpo_run(toy_models, tmp_path / "unmasked", "--max_iters", "1", "--eval_interval", "1")
        unmasked_sft = small_sft(pairs_file, tmp_path / "sft-unmasked")
    # the prompt is the same in both rows of a pair: its log-probs cancel in h, to rounding
    assert unmasked[-1]["loss"] == pytest.approx(masked[-1]["loss"], abs=1e-5)
    assert unmasked[-1]["logps/chosen"] < masked[-1]["logps/chosen"] - 5  # the logged sums now hold the prompt
    # SFT without the mask learned the prompts: 7.7 against 8.8 nats a token here, after 30 small steps
    assert prompt_nll(unmasked_sft) < prompt_nll(unbroken_sft) - 0.5


def test_no_eos_leaves_the_model_no_way_to_stop(pairs_file, unbroken_sft, tmp_path):
    import torch
    from data import EOS, get_tokenizer, load_preferences
    from machinery.models import open_model
    with broken("no-eos"):
        without = small_sft(pairs_file, tmp_path / "without")
    tokenizer = get_tokenizer()
    pair = load_preferences(pairs_file, "test", verbose=False)[0]
    ids = tokenizer.encode_ordinary(pair["prompt"] + pair["chosen"])
    eos_logp = {}
    for name, out_dir in (("with", unbroken_sft), ("without", without)):
        with torch.no_grad():
            logits = open_model(out_dir)(torch.tensor([ids]))[0, -1]
        eos_logp[name] = logits.log_softmax(-1)[EOS].item()  # after the whole reply: stop here?
    # 30 steps teach a small model little, but EOS only where it was trained: 3 nats apart here (-7.6, -10.8)
    assert eos_logp["with"] > eos_logp["without"] + 2, eos_logp


def test_each_micro_batchs_own_mean_changes_the_gradient(pairs_file, tmp_path):
    def first_grad_norm(name, batch_size, grad_accum):
        out_dir = tmp_path / f"{name}-{grad_accum}"
        # real HH replies, whose lengths differ a lot (the toy ones hardly do)
        sft.main(["--init", "scratch", "--data", os.path.dirname(HH_TEST), "--max_iters", "1", "--eval_interval", "0",
                  "--lr", "1e-3", "--warmup", "1", "--batch_size", str(batch_size), "--grad_accum", str(grad_accum),
                  "--out_dir", str(out_dir), "--device", "cpu", "--n_layer", "1", "--n_head", "2", "--n_embd", "32",
                  "--eval_batches", "1", "--max_len", "128"])
        return read_log(out_dir, "train")[0]["grad_norm"]
    right = first_grad_norm("right", 8, 4), first_grad_norm("right", 32, 1)
    with broken("per-micro-batch-mean"):
        wrong = first_grad_norm("wrong", 8, 4), first_grad_norm("wrong", 32, 1)
    assert right[0] == pytest.approx(right[1], rel=1e-5)  # 4 micro-batches of 8 = one batch of 32, exactly
    assert abs(wrong[0] - wrong[1]) / wrong[1] > 1e-3  # each micro-batch's own mean: another gradient


def test_a_learning_rate_ten_times_too_high_collapses_logps_chosen_and_the_watchdog_says_so(toy_models, tmp_path,
                                                                                             capsys):
    lr = 10 * dpo.DEMO["lr"]  # the exercise's `python dpo.py --demo --lr 5e-4`
    evals = dpo_run(toy_models, tmp_path, "--max_iters", str(dpo.DEMO["max_iters"]), "--eval_interval", "20",
                    "--lr", str(lr))
    assert evals[-1]["logps/chosen"] < evals[0]["logps/chosen"] - 5
    assert "warning: at step" in capsys.readouterr().out
