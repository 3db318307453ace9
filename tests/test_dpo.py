"""dpo.py: the objective checked against its maths, the batching against separate passes, and the loop
on the toy task (the good model learns the preference, the swapped one learns its opposite)."""
import argparse
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import dpo
from conftest import make_hf_gpt2, read_log
from data import dpo_batch, toy_pairs, tokenize_pairs
from model import GPT, GPTConfig


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=128, vocab_size=50257, n_layer=2, n_head=2, n_embd=16)).double()


def toy_batch(n=8):
    return tokenize_pairs(toy_pairs("train")[:n], 64, 32, verbose=False)


def test_policy_equal_to_reference_gives_ln2_and_zero_rewards():
    model = tiny_model()
    input_ids, labels = dpo_batch(toy_batch())
    chosen, rejected = dpo.pair_logps(model, (input_ids, labels))
    losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(chosen, rejected, chosen.detach(), rejected.detach(), 0.1)
    assert torch.equal(losses, torch.full_like(losses, math.log(2)))
    assert torch.equal(chosen_rewards, torch.zeros_like(chosen_rewards))
    assert torch.equal(rejected_rewards, torch.zeros_like(rejected_rewards))
    args = argparse.Namespace(beta=0.1, loss_type="sigmoid", label_smoothing=0.0, device="cpu", share_prompt=False)
    losses, sums = dpo.micro_batch(model, model, toy_batch(), range(8), None, args)
    assert dict(zip(dpo.METRICS, (sums / 8).tolist()))["rewards/accuracy"] == 0.5  # ties count half


def test_sigmoid_gradient_is_the_papers_weighted_difference_of_log_prob_gradients():
    """grad L = -beta sigmoid(-beta h) (grad log pi(y_w) - grad log pi(y_l)), h the log-ratio margin (sec. 4)."""
    policy, reference, beta = tiny_model(0), tiny_model(1), 0.5
    input_ids, labels = dpo_batch(toy_batch(1))
    with torch.no_grad():
        ref_chosen, ref_rejected = dpo.pair_logps(reference, (input_ids, labels))

    def grad_of(scalar):
        policy.zero_grad()
        scalar.backward()
        return torch.cat([p.grad.flatten() for p in policy.parameters()])

    chosen, rejected = dpo.pair_logps(policy, (input_ids, labels))
    grad_chosen = grad_of(chosen.sum())
    chosen, rejected = dpo.pair_logps(policy, (input_ids, labels))
    grad_rejected = grad_of(rejected.sum())
    chosen, rejected = dpo.pair_logps(policy, (input_ids, labels))
    h = ((chosen - ref_chosen) - (rejected - ref_rejected)).detach()
    grad_loss = grad_of(dpo.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)[0].sum())
    expected = -beta * torch.sigmoid(-beta * h) * (grad_chosen - grad_rejected)
    assert h.abs().item() > 0.01  # a real margin, so the weight is not the trivial 1/2
    torch.testing.assert_close(grad_loss, expected, atol=1e-10, rtol=1e-8)


def test_ipo_and_conservative_dpo_match_hand_computed_values():
    torch.manual_seed(0)
    pc, pr, rc, rr = (torch.randn(16, dtype=torch.float64) * 5 for _ in range(4))
    beta, eps = 0.3, 0.2
    ipo = dpo.dpo_loss(pc, pr, rc, rr, beta, loss_type="ipo")[0]
    cdpo = dpo.dpo_loss(pc, pr, rc, rr, beta, label_smoothing=eps)[0]
    for i in range(16):
        h = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        sigmoid = 1 / (1 + math.exp(-beta * h))
        assert ipo[i].item() == pytest.approx((h - 1 / (2 * beta)) ** 2, rel=1e-12)
        assert cdpo[i].item() == pytest.approx(-(1 - eps) * math.log(sigmoid) - eps * math.log(1 - sigmoid), rel=1e-9)
    plain = dpo.dpo_loss(pc, pr, rc, rr, beta)[0]
    torch.testing.assert_close(plain, -F.logsigmoid(beta * ((pc - rc) - (pr - rr))))


def test_one_concatenated_pass_equals_separate_passes_and_padding_changes_nothing():
    model, pairs = tiny_model(), toy_batch(4)
    input_ids, labels = dpo_batch(pairs)
    chosen, rejected = dpo.pair_logps(model, (input_ids, labels))
    for i, pair in enumerate(pairs):
        alone_ids, alone_labels = dpo_batch([pair])  # this pair's own width: less padding
        alone_chosen, alone_rejected = dpo.pair_logps(model, (alone_ids, alone_labels))
        torch.testing.assert_close(alone_chosen[0], chosen[i], atol=1e-10, rtol=0)
        torch.testing.assert_close(alone_rejected[0], rejected[i], atol=1e-10, rtol=0)
    # 20 more columns of padding: causal attention means no real position can see them
    wide_ids = F.pad(input_ids, (0, 20), value=123)
    wide_labels = F.pad(labels, (0, 20), value=-100)
    wide_chosen, wide_rejected = dpo.pair_logps(model, (wide_ids, wide_labels))
    torch.testing.assert_close(wide_chosen, chosen, atol=1e-10, rtol=0)
    torch.testing.assert_close(wide_rejected, rejected, atol=1e-10, rtol=0)


def test_accumulating_four_micro_batches_of_two_equals_one_batch_of_eight():
    policy, reference, pairs = tiny_model(0), tiny_model(1), toy_batch(8)

    def loss_sum(batch_pairs):
        input_ids, labels = dpo_batch(batch_pairs)
        with torch.no_grad():
            ref = dpo.pair_logps(reference, (input_ids, labels))
        return dpo.dpo_loss(*dpo.pair_logps(policy, (input_ids, labels)), *ref, 0.1)[0].sum()

    (loss_sum(pairs) / 8).backward()
    one_batch = torch.cat([p.grad.flatten() for p in policy.parameters()])
    policy.zero_grad()
    for m in range(4):
        (loss_sum(pairs[2 * m:2 * m + 2]) / 8).backward()  # as in dpo.py: / pairs per optimizer step
    accumulated = torch.cat([p.grad.flatten() for p in policy.parameters()])
    torch.testing.assert_close(accumulated, one_batch, atol=1e-6, rtol=0)


def test_precomputed_reference_gives_the_same_losses_as_the_live_one(tmp_path):
    init = tmp_path / "init"
    make_hf_gpt2(init, n_positions=64, n_layer=2, n_head=2, n_embd=32)
    data = tmp_path / "pairs.jsonl"  # 80 toy pairs (76 train, 4 test): precomputing covers them all
    data.write_text("".join(json.dumps(pair) + "\n" for pair in toy_pairs("train")[:80]))
    runs = {}
    for name, extra in (("live", []), ("precomputed", ["--precompute_ref"])):
        dpo.main(["--demo", "--init", str(init), "--data", str(data), "--max_iters", "4", "--batch_size", "4",
                  "--grad_accum", "2",
                  "--lr", "1e-3", "--eval_interval", "2", "--eval_batches", "1", "--out_dir", str(tmp_path / name)]
                 + extra)
        runs[name] = read_log(tmp_path / name, "train") + read_log(tmp_path / name, "test")
    assert len(runs["live"]) == 4 + 3  # 4 steps; evals at 0, 2 and the end
    for live, pre in zip(runs["live"], runs["precomputed"]):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy"):
            assert pre[key] == pytest.approx(live[key], abs=1e-6)
    assert runs["live"][-1]["loss"] < runs["live"][0]["loss"]  # the steps did change the policy


def test_compile_with_a_precomputed_reference_compiles_the_policy_alone(tmp_path, monkeypatch):
    compiled = []  # GPT.compile recorded, not run: a CPU compile would take a minute; test_cuda.py runs it
    monkeypatch.setattr(GPT, "compile", lambda self: compiled.append(self))
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(pair) + "\n" for pair in toy_pairs("train")[:24]))
    dpo.main(["--demo", "--init", "scratch", "--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--max_iters", "1",
              "--batch_size", "2", "--eval_interval", "0", "--eval_batches", "1", "--precompute_ref", "--compile",
              "--data", str(data), "--out_dir", str(tmp_path / "run")])
    assert len(compiled) == 1 and read_log(tmp_path / "run", "train")[0]["iter"] == 1


def test_step_zero_eval_in_the_script_reads_ln2_and_logs_every_metric(toy_models):
    first_eval = read_log(toy_models["dpo"], "test")[0]
    assert first_eval["iter"] == 0
    assert first_eval["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert first_eval["rewards/chosen"] == 0.0 and first_eval["rewards/rejected"] == 0.0
    assert first_eval["rewards/accuracy"] == 0.5
    step = read_log(toy_models["dpo"], "train")[0]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
                "logps/chosen", "logps/rejected", "grad_norm", "lr", "dt_ms", "tokens_per_s"):
        assert key in step


def test_toy_dpo_learns_the_preference_and_swap_learns_its_opposite(toy_models):
    good = read_log(toy_models["dpo"], "test")[-1]
    bad = read_log(toy_models["dpo-bad"], "test")[-1]
    assert good["rewards/accuracy"] > 0.9 and good["rewards/margin"] > 0
    assert bad["rewards/accuracy"] < 0.1 and bad["rewards/margin"] < 0  # judged on the true preferences


@pytest.mark.parametrize("flags, message", [
    (["--beta", "0"], "--beta: must be a positive number"),
    (["--beta", "-0.5"], "--beta: must be a positive number"),
    (["--init", "no/such/dir"], "run `python sft.py --demo` first"),
    (["--grad_accum", "0"], "--grad_accum: must be at least 1"),
    (["--data", "missing.jsonl"], "data file missing.jsonl does not exist"),
])
def test_bad_input_is_one_line_and_a_non_zero_exit(flags, message, capsys, toy_models, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        dpo.main(["--demo", "--init", toy_models["sft"], "--max_iters", "1", "--out_dir", str(tmp_path / "x")] + flags)
    code, stderr = exit_info.value.code, capsys.readouterr().err
    shown = stderr + (code if isinstance(code, str) else "")
    assert code not in (0, None)
    assert message in shown and "Traceback" not in shown


def test_init_and_ref_of_different_shapes_are_refused(tmp_path, capsys, toy_models):
    other = tmp_path / "other"
    make_hf_gpt2(other, n_positions=64, n_layer=1, n_head=2, n_embd=32)
    with pytest.raises(SystemExit) as exit_info:
        dpo.main(["--demo", "--init", toy_models["sft"], "--ref", str(other), "--max_iters", "1", "--out_dir",
                  str(tmp_path / "x")])
    assert "differ in shape" in str(exit_info.value.code)


def test_from_scratch_the_reference_is_the_same_random_model(tmp_path):
    dpo.main(["--demo", "--init", "scratch", "--max_iters", "1", "--eval_interval", "1", "--eval_batches", "1",
              "--batch_size", "4", "--out_dir", str(tmp_path), "--n_layer", "1", "--n_head", "2", "--n_embd", "32"])
    assert read_log(tmp_path, "test")[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)


def test_the_schedule_warms_up_then_stays_constant():
    import argparse
    args = argparse.Namespace(lr=1.0, warmup=4)
    assert [dpo.get_lr(s, args) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]  # the paper's schedule
    assert dpo.get_lr(10_000, args) == 1.0


def test_share_prompt_trains_like_the_stacked_batch(tmp_path):
    runs = {}
    for name, extra in (("stacked", []), ("packed", ["--share_prompt"])):
        dpo.main(["--demo", "--init", "scratch", "--n_layer", "1", "--n_head", "2", "--n_embd", "32",
                  "--max_iters", "3", "--batch_size", "4", "--lr", "1e-3", "--eval_interval", "0",
                  "--eval_batches", "1", "--out_dir", str(tmp_path / name)] + extra)
        runs[name] = read_log(tmp_path / name, "train")
    for stacked, packed in zip(runs["stacked"], runs["packed"]):
        assert packed["loss"] == pytest.approx(stacked["loss"], abs=1e-5)
        assert packed["tokens_per_s"] > 0
