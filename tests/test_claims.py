"""The README's sentences, checked against the results they rest on. The numbers in the README are generated
(tests/test_tables.py); the sentences around them are written by hand, and each test here fails when a rerun
of an experiment no longer supports one, naming the section to rewrite."""
import math
from collections import defaultdict

import dpo
import sft
from experiments import tables
from machinery.results import mean_and_sem


def differ(a, a_se, b, b_se):
    """Whether two means differ by more than twice the standard error of their difference."""
    return abs(a - b) > 2 * math.hypot(a_se, b_se)


# ----------------------------------------------------------------------------------------------------
# Section 1: one pair, by hand

def test_the_worked_pair_adds_up_and_still_pulls_about_half():
    w = tables.load("worked-example.json")
    assert w["h"] == (w["chosen"] - w["ref_chosen"]) - (w["rejected"] - w["ref_rejected"])
    assert w["chosen"] > w["ref_chosen"] and w["rejected"] < w["ref_rejected"]  # "raised ... moved the rejected"
    assert abs(w["loss"] - math.log1p(math.exp(-w["beta_h"]))) < 1e-6  # -log sigmoid(beta h)
    assert 0.4 < w["pull"] < 0.5  # "still close to ½": the pair is ranked right, by little
    assert w["pair"] == tables.data.toy_pairs("test")[0]  # "the first held-out pair"


# ----------------------------------------------------------------------------------------------------
# Section 2: the demo, its seeds, and how its settings were chosen

def candidates():
    record = tables.load("demo-seeds.json")
    groups = defaultdict(list)
    for run in record["runs"]:
        groups[run["sft_steps"], run["dpo"]].append(run)
    return groups


def test_the_demo_gains_in_every_seed_and_stays_near_its_reference():
    runs = tables.demo_runs()
    assert len(runs) == 5 and all(r["gain"] > 0 for r in runs)  # "gained in all five"
    assert all(r["dpo_model"]["kl"] < 0.25 for r in runs)  # "at a KL under a quarter of a nat"
    assert all(r["dpo_model"]["accuracy"] > 0.9 and r["bad"]["accuracy"] < 0.1 for r in runs)
    samples = tables.load("demo.json")["samples"]
    gain, error = mean_and_sem([b["reward"] - a["reward"] for a, b in zip(samples["sft"], samples["dpo"])])
    assert gain > 2 * error  # the committed run's gain is more than its sampling noise
    # "another --seed moves SFT and DPO about as far as their sampling noise, the bad model further"
    spans = {}
    for key in ("sft", "dpo_model", "bad"):
        rewards = [r[key]["oracle_reward"] for r in runs]
        spans[key], noise = max(rewards) - min(rewards), max(r[key]["oracle_reward_se"] for r in runs)
        if key != "bad":
            assert noise / 2 < spans[key] < 4 * noise, key
    assert spans["bad"] > max(spans["sft"], spans["dpo_model"])


def test_from_300_sft_steps_no_setting_helped_and_the_sft_model_answered_less():
    groups = candidates()
    for (steps, setting), runs in groups.items():
        if steps == 300:
            gain, error = mean_and_sem([r["gain"] for r in runs])
            assert gain < 2 * error, setting  # "no setting helped"
    answered = {steps: mean_and_sem([r["sft"]["answered"] for (s, _), runs in groups.items() if s == steps
                                     for r in runs])[0] for steps in (300, 500)}
    assert answered[300] < answered[500] - 0.1  # "answers fewer of the new requests"
    by_kl = sorted((max(r["dpo_model"]["kl"] for r in runs), mean_and_sem([r["dpo_model"]["answered"] for r in runs])[0])
                   for (steps, _), runs in groups.items() if steps == 300)
    assert all(a < answered[300] for _, a in by_kl)  # "and DPO broke more answers"
    assert by_kl[-1][1] < by_kl[0][1]  # "the more the further it went"


def test_from_500_steps_only_the_small_steps_gained_in_every_seed_near_the_reference():
    groups = candidates()
    demo_setting = tables.demo_runs()[0]["dpo"]
    for (steps, setting), runs in groups.items():
        if steps != sft.DEMO["max_iters"]:
            continue
        every_seed = all(r["gain"] > 0 for r in runs)
        far = max(r["dpo_model"]["kl"] for r in runs)
        if setting.startswith("lr 1e-4") or setting == "lr 5e-5, 80 steps":
            assert not every_seed and far > 10, setting  # "not in every seed ... a KL of over 10 nats"
        else:
            assert every_seed and far < 0.25, setting
    chosen = mean_and_sem([r["gain"] for r in groups[sft.DEMO["max_iters"], demo_setting]])
    fast = mean_and_sem([r["gain"] for r in groups[sft.DEMO["max_iters"], "lr 1e-4, 40 steps"]])
    assert not differ(*chosen, *fast)  # "as much on average"
    slow = mean_and_sem([r["gain"] for r in groups[sft.DEMO["max_iters"], "lr 2e-5, 80 steps"]])
    assert slow[0] < chosen[0] and not differ(*slow, *chosen)  # "lower but within the errors"
    assert 1337 not in tables.load("demo-seeds.json")["seeds"]  # the committed demo's seed, "not among them"
    assert dpo.DEMO["lr"] == 5e-5 and dpo.DEMO["max_iters"] == 40 and demo_setting == "lr 5e-5, 40 steps"
    assert dpo.DEMO["eval_batches"] * dpo.DEMO["batch_size"] == 32  # section 6: "32 pairs in the demo"


def test_every_demo_sample_scored_plus_or_minus_one():
    samples = tables.load("demo.json")["samples"]
    assert set(samples) == {"sft", "dpo", "dpo-bad"} and all(len(v) == 64 for v in samples.values())
    assert {s["reward"] for v in samples.values() for s in v} == {-1.0, 1.0}  # "scored +1 or −1"


def test_the_committed_demo_drew_low_rewards_but_a_typical_gain():
    summary, runs = tables.load("demo.json")["summary"], tables.demo_runs()
    for label, key in (("sft", "sft"), ("dpo", "dpo_model")):  # "below those ranges"
        assert summary[label]["oracle_reward"] < min(r[key]["oracle_reward"] for r in runs), label
    samples = tables.load("demo.json")["samples"]
    gain = mean_and_sem([b["reward"] - a["reward"] for a, b in zip(samples["sft"], samples["dpo"])])
    seed_gains = [r["gain"] for r in runs]
    assert min(seed_gains) <= gain[0] <= max(seed_gains)  # "yet it gained as much as they did"
    assert not differ(*gain, *mean_and_sem(seed_gains))


def test_the_same_sft_recipe_scored_higher_on_the_demos_64_prompts_than_on_all_200():
    assert tables.load("demo-seeds.json")["prompts"] == 64 and tables.load("beta-frontier.json")["prompts"] == 200
    on_64 = {r["seed"]: r["sft"]["oracle_reward"] for r in tables.demo_runs()}
    on_200 = {r["seed"]: r["sft_reward"] for r in tables.load("sft-length.json")["runs"]
              if r["sft_steps"] == sft.DEMO["max_iters"]}
    assert sorted(on_200) == [1, 2, 3] and all(on_64[seed] > on_200[seed] for seed in on_200)


def test_beta_5_in_the_demo_is_the_same_as_beta_0_1_within_the_errors():
    summary = tables.load("demo-knob.json")["summary"]
    knob, demo = summary["dpo-beta5.0"], summary["dpo"]
    assert not differ(knob["oracle_reward"], knob["oracle_reward_se"], demo["oracle_reward"], demo["oracle_reward_se"])
    assert knob["kl"] < 0.5 and demo["kl"] < 0.5  # "barely leaves the reference"


# ----------------------------------------------------------------------------------------------------
# Section 5: how long to train SFT

def test_dpo_gained_most_where_sft_reached_its_floor_and_less_past_it():
    rows, floor = tables.sft_length_rows(), tables.load("sft-length.json")["floor"]["nats"]
    assert rows[150]["sft_reward"][0] < -0.9 and abs(rows[150]["gain"][0]) < 2 * rows[150]["gain"][1] + 0.02
    best = max(rows, key=lambda steps: rows[steps]["gain"][0])
    assert best == sft.DEMO["max_iters"] == 500  # "gained most from 500", where the demo stops
    assert rows[500]["sft_test_loss"][0] < 1.02 * floor  # "reaches the data's floor"
    assert all(rows[steps]["sft_test_loss"][0] > 1.05 * floor for steps in (150, 300))
    longer = [steps for steps in rows if steps > 500]
    sft_rewards = [rows[steps]["sft_reward"][0] for steps in [500] + longer]
    assert max(sft_rewards) - min(sft_rewards) < 0.1  # "SFT's own reward stayed level"
    assert rows[1000]["kl"][0] < rows[500]["kl"][0] / 2  # "moved the policy less"
    assert rows[1000]["gain"][0] < rows[500]["gain"][0]  # "gained no more"
    # "with each seed's own sampling noise on top, the gain does not tell 500, 700 and 1,000 apart"
    runs = tables.load("sft-length.json")["runs"]
    def gain(steps):
        mine = [r for r in runs if r["sft_steps"] == steps]
        sampling = math.sqrt(sum(r["gain_se"] ** 2 for r in mine)) / len(mine)
        return rows[steps]["gain"][0], math.hypot(rows[steps]["gain"][1], sampling)
    assert not any(differ(*gain(a), *gain(b)) for a, b in ((500, 700), (500, 1000), (700, 1000)))


# ----------------------------------------------------------------------------------------------------
# Sections 6 and 7: the curves and beta

def cell(family, step, key):
    return mean_and_sem([p[key] for p in tables.load("beta-frontier.json")["points"][f"{family}@{step}"]])


def test_the_demos_curves_rise_then_lower_both_replies_for_little():
    values = {(key, step): mean_and_sem(tables.curve_values("beta0.1", key, step)) for key in
              ("logps/chosen", "logps/rejected", "loss") for step in (0, 40, 80)}
    assert all(value == 1.0 for step in (10, 20, 40, 80) for value in tables.curve_values("beta0.1", "rewards/accuracy", step))
    assert values["logps/chosen", 40][0] > values["logps/chosen", 0][0]  # rises to step 40
    assert values["logps/chosen", 80][0] < values["logps/chosen", 40][0]  # then turns down
    assert values["logps/rejected", 80][0] < values["logps/rejected", 40][0] - 5  # pushed down far more
    assert cell("beta0.1", 80, "kl")[0] > 20 * cell("beta0.1", 40, "kl")[0]
    assert cell("beta0.1", 80, "length")[0] > cell("beta0.1", 40, "length")[0] + 1
    reward40, reward80 = cell("beta0.1", 40, "reward"), cell("beta0.1", 80, "reward")
    assert reward80[0] - reward40[0] < max(reward40[1], reward80[1]) * 2  # "no more than its seed-to-seed spread"
    assert mean_and_sem(tables.curve_values("beta0.1-lr2e-05", "loss", 80))[0] > 0.65  # "moves slowly"


def test_beta_changed_nothing_to_step_40_and_held_the_policy_close_by_step_80():
    record = tables.load("beta-frontier.json")
    families = [f for f in record["families"] if "-lr" not in f]
    for step in (20, 40):
        rewards = [cell(f, step, "reward") for f in families]
        kls = [cell(f, step, "kl")[0] for f in families]
        assert max(r[0] for r in rewards) - min(r[0] for r in rewards) < min(r[1] for r in rewards) + 0.02
        assert max(kls) - min(kls) < 0.02
    pulls = {step: [1 / (1 + math.exp(m)) for m in tables.curve_values("beta5", "rewards/margin", step)]
             for step in (20, 40)}
    assert max(pulls[20]) < 0.3 and max(pulls[40]) < 0.1  # "not because the pull stayed at 1/2"
    first = {f: mean_and_sem(tables.curve_values(f, "grad_norm", 1, "train"))[0] for f in ("beta0.1", "beta5")}
    assert first["beta5"] > 30 * first["beta0.1"]  # "beta also multiplies the gradient"
    small = [f for f in families if f != "beta5"]
    assert all(cell(f, 80, "kl")[0] > 5 for f in small) and cell("beta5", 80, "kl")[0] < 2
    points = tables.load("beta-frontier.json")["points"]
    assert all(sum(p["kl"] < 1.5 for p in points[f"{f}@80"]) == 1 for f in small)  # "one seed of each under 1.5"
    assert all(cell(f, 80, "length")[0] > cell("beta5", 80, "length")[0] + 1 for f in small)
    assert all(cell("beta5", 80, "reward")[0] >= cell(f, 80, "reward")[0] for f in small)  # the highest mean
    assert all(cell("beta5", 80, "reward")[1] < cell(f, 80, "reward")[1] for f in small)  # the smallest spread
    losses = [mean_and_sem(tables.curve_values("beta0.1", "loss", step))[0] for step in (40, 60, 80)]
    assert losses == sorted(losses, reverse=True) and cell("beta0.1", 80, "reward")[0] <= cell("beta0.1", 60, "reward")[0]


# ----------------------------------------------------------------------------------------------------
# Section 8: the exercises

def test_each_exercise_shows_what_its_sentence_says():
    e = tables.load("exercises.json")
    assert e["mean"]["mean"]["margin"] < e["mean"]["sum"]["margin"] / 10
    assert abs(e["mean"]["mean"]["reward"] - e["mean"]["sum"]["reward"]) < 0.05  # "came out the same"
    assert abs(e["mean"]["mean"]["kl"] - e["mean"]["sum"]["kl"]) < 0.02
    moving = e["moving-reference"]
    assert max(moving["losses"]) - min(moving["losses"]) < 1e-6 and abs(moving["losses"][0] - math.log(2)) < 1e-6
    assert abs(moving["kl"] - e["mean"]["sum"]["kl"]) < 0.02  # "as far as the unbroken run"
    mask = e["no-prompt-mask"]
    assert abs(mask["dpo_loss"] - mask["dpo_loss_masked"]) < 1e-5 and mask["prompt_nll"] < mask["prompt_nll_masked"] / 10
    assert e["no-eos"]["length"] > 0.95 * e["no-eos"]["max_new_tokens"] > e["no-eos"]["length_with_eos"]
    norms = e["per-micro-batch-mean"]
    for data_name in ("toy", "HH"):
        assert abs(norms[f"{data_name}: 4 micro-batches"] - norms[f"{data_name}: one batch"]) < 1e-5
    toy, hh = (abs(norms[f"{d}: 4 micro-batches (broken)"] / norms[f"{d}: one batch"] - 1) for d in ("toy", "HH"))
    assert hh > 3 * toy > 0
    high = e["high-lr"]
    assert high["lr"] == 10 * dpo.DEMO["lr"] and high["logps_chosen"][-1] < high["logps_chosen"][0] - 5
    assert high["kl"] > 10 and high["reward"] == -1.0


# ----------------------------------------------------------------------------------------------------
# Section 9 and docs/rlhf.md: what DPO replaced

def seeds(method, limit):
    """The rewards of a method's seeds' best checkpoints within a KL budget, at its best setting."""
    return [p[2] for p in tables.seed_bests(tables.load("frontier.json"), method, limit) if p is not None]


def test_ppo_got_further_than_dpo_for_the_same_kl_and_nobody_wrote_less():
    record = tables.load("frontier.json")
    ppo, ppo_gt = seeds("PPO", 1), seeds("PPO-GT", 1)
    offline, onpolicy, preferred = seeds("DPO, offline pairs", 1), seeds("DPO, on-policy pairs", 1), seeds("Preferred-FT", 1)
    best_of_4 = tables.best_within(record, "Best-of-N", 1)
    assert min(ppo) > 0.8 and not differ(*mean_and_sem(ppo), best_of_4[2], best_of_4[3])  # "as far as best-of-4"
    assert min(ppo) > max(onpolicy) and min(ppo) > max(offline)  # PPO further than DPO, on every seed
    assert sorted(ppo_gt)[0] < 0.4 < sorted(ppo_gt)[1] and min(seeds("PPO-GT", 3)) > 0.65  # one seed late to 1 nat
    assert min(ppo) > max(seeds("PPO-GT", 3))  # "PPO on a learned reward beat PPO on the true one"
    assert max(onpolicy) > 0.65 and sorted(onpolicy)[1] < 0.3  # "0.71 on one seed and about 0.25 on the other two"
    assert all(seeds("DPO, offline pairs", limit) == offline for limit in tables.BUDGETS)  # "at every budget"
    assert differ(*mean_and_sem(preferred), *mean_and_sem(offline)) and max(offline) < min(preferred)
    sweep = tables.best_within(record, "DPO, offline pairs", 3)  # "another setting went higher ... and collapsed"
    run = next(label for label in record["runs"]["DPO, offline pairs"]
               if any(p[1:4] == (sweep[0], sweep[2], sweep[3]) for p in tables.run_path(record, label)))
    assert sweep[2] > max(offline) + 0.2 and tables.collapsed(tables.run_path(record, run))
    sft_length = record["points"]["sft"][4]
    for method in tables.METHOD_ORDER[:-1]:
        for limit in tables.BUDGETS:
            for point in filter(None, tables.seed_bests(record, method, limit)):
                assert abs(point[4] - sft_length) < 1, (method, limit)  # "within a token: no method wrote less"
    assert float(tables.frontier_ratio("tokens")) > 1 and float(tables.frontier_ratio("wall")) > 1


def test_the_seeds_agree_but_for_dpo_on_on_policy_pairs():
    record = tables.load("frontier.json")
    finals = {method: [tables.run_path(record, label)[-1][2] for label in tables.best_setting_runs(record, method)]
              for method in tables.METHOD_ORDER[:-1]}
    for method in ("PPO", "PPO-GT", "Preferred-FT", "DPO, offline pairs"):
        assert max(finals[method]) - min(finals[method]) < 0.2, method
    onpolicy = finals["DPO, on-policy pairs"]
    assert max(onpolicy) - min(onpolicy) > 1 and min(onpolicy) < 0
    labels = tables.best_setting_runs(record, "DPO, on-policy pairs")
    fell = [tables.run_path(record, label)[-1][1] for label in labels if tables.collapsed(tables.run_path(record, label))]
    assert len(fell) == 2 and min(fell) > 9  # "two of its three seeds collapsed ... (to 9.6 and 15 nats)"


def test_another_thread_count_moves_the_demo_within_its_errors():
    one, two = tables.load("demo-threads.json"), tables.load("demo.json")
    assert one["machine"]["threads"] == 1 and two["machine"]["threads"] == 2
    assert one["summary"] != two["summary"]  # "rounds differently, and training carries that into the samples"
    for label in ("sft", "dpo", "dpo-bad"):
        a, b = one["summary"][label], two["summary"][label]
        assert not differ(a["oracle_reward"], a["oracle_reward_se"], b["oracle_reward"], b["oracle_reward_se"]), label
