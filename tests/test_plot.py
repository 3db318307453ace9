"""plot.py: the numbers it draws (series, means, standard errors), the PNGs it writes, and bad input."""
import json
import math
import os

import pytest

import dpo
import plot
from conftest import refused
from machinery import UserError
from machinery.results import mean_and_sem

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_dpo_log(directory):
    """A tiny hand-written dpo.py log: evals at steps 0 and 2, train records at steps 1 and 2."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for step, split, loss, accuracy in [(0, "test", 0.693, 0.5), (1, "train", 0.69, 0.6),
                                        (2, "train", 0.60, 0.9), (2, "test", 0.65, 0.8)]:
        rows.append({"iter": step, "split": split, "loss": loss, "rewards/chosen": 0.1 * step,
                     "rewards/rejected": -0.2 * step, "rewards/margin": 0.3 * step, "rewards/accuracy": accuracy,
                     "logps/chosen": -5.0 + step, "logps/rejected": -5.0 - step})
    (directory / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def write_samples(path, models):
    """A sample.py-like results file: {label: [(reward, kl), ...]}."""
    samples = {label: [{"prompt": "p", "completion": "c", "tokens": 3, "kl": kl, "reward": reward}
                       for reward, kl in rows] for label, rows in models.items()}
    path.write_text(json.dumps({"settings": {}, "reference": "sft", "summary": {}, "samples": samples}))
    return path


def test_mean_and_sem():
    mean, sem = mean_and_sem([1.0, 0.0, 1.0, 0.0])
    assert mean == 0.5
    assert sem == pytest.approx(math.sqrt(1 / 3) / 2)  # std (ddof 1) = sqrt(1/3), over sqrt(4)
    assert math.isnan(mean_and_sem([2.0])[1])  # one value: no error estimate, not a fake zero


def test_series_sorted_by_step_and_split(tmp_path):
    records = plot.read_log(str(write_dpo_log(tmp_path / "run")))
    steps, values = plot.series(records, "test", "logps/rejected")
    assert steps.tolist() == [0, 2] and values.tolist() == [-5.0, -7.0]
    steps, values = plot.series(records, "train", "loss")
    assert steps.tolist() == [1, 2] and values.tolist() == [0.69, 0.60]


def test_parse_label():
    assert plot.parse_label("beta0.1@40") == ("beta0.1", 40)
    assert plot.parse_label("sft") == ("sft", None)
    with pytest.raises(UserError):
        plot.parse_label("beta0.1@late")


def test_frontier_points(tmp_path):
    path = write_samples(tmp_path / "r.json", {"sft": [(0.0, 0.0), (1.0, 0.0)],
                                               "b@20": [(1.0, 1.0), (1.0, 3.0), (0.0, 2.0)]})
    points = plot.frontier_points([str(path)])
    assert points["sft"]["reward"] == 0.5 and points["sft"]["kl_sem"] == 0.0
    assert points["b@20"]["kl"] == 2.0 and points["b@20"]["kl_sem"] == pytest.approx(1 / math.sqrt(3))
    assert points["b@20"]["reward_sem"] == pytest.approx(math.sqrt(1 / 3) / math.sqrt(3))
    assert points["b@20"]["n"] == 3


def test_writes_pngs(tmp_path):
    run = write_dpo_log(tmp_path / "run")
    plot.main(["curves", f"a={run}", f"b={run}", "--out", str(tmp_path / "curves.png")])
    path = write_samples(tmp_path / "r.json", {"sft": [(0.0, 0.0), (1.0, 0.0)],
                                               "b@20": [(1.0, 1.0), (0.0, 3.0)], "b@40": [(1.0, 2.0), (1.0, 4.0)]})
    plot.main(["frontier", str(path), "--out", str(tmp_path / "frontier.png")])
    for name in ("curves.png", "frontier.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC


def test_sft_log_gets_the_loss_panel_only(tmp_path):
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "log.jsonl").write_text('{"iter": 0, "split": "test", "loss": 10.8, "ppl": 5e4}\n'
                                                '{"iter": 1, "split": "train", "loss": 9.0, "lr": 0.001}\n')
    plot.main(["curves", f"sft={tmp_path / 'sft'}", "--hline", "0.155:floor", "--out", str(tmp_path / "sft.png")])
    assert (tmp_path / "sft.png").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(SystemExit):  # an SFT and a DPO log on one axis would compare unlike losses
        plot.main(["curves", f"sft={tmp_path / 'sft'}", f"dpo={write_dpo_log(tmp_path / 'dpo')}",
                   "--out", str(tmp_path / "mixed.png")])


@pytest.mark.parametrize("argv", [["curves", "x=MISSING_DIR"], ["frontier", "MISSING.json"]])
def test_bad_input_is_one_line_and_nonzero_exit(tmp_path, capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        plot.main([a.replace("MISSING", str(tmp_path / "missing")) for a in argv]
                  + ["--out", str(tmp_path / "x.png")])
    err = exit_info.value.code
    assert isinstance(err, str) and "\n" not in err and err.startswith("error: ") and "missing" in err
    assert not (tmp_path / "x.png").exists()


def test_a_torn_last_line_is_dropped_with_a_notice_as_resume_does(tmp_path, capsys):
    run = write_dpo_log(tmp_path / "run")
    with open(run / "log.jsonl", "a") as f:
        f.write('{"iter": 3, "split": "tra')  # what kill -9 in the middle of a write leaves
    plot.main(["curves", str(run), "--out", str(tmp_path / "x.png")])
    assert "log.jsonl:5 is not a whole record (cut off by a crash?); dropped" in capsys.readouterr().out
    assert (tmp_path / "x.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("content", [b"\xff\xfe\x00 binary \x00" * 50, b'{"not": "a record"}\n'],
                         ids=["binary", "no_records"])
def test_a_log_with_no_records_is_one_line_and_no_png(tmp_path, capsys, content):
    (tmp_path / "log.jsonl").write_bytes(content)
    line = refused(lambda: plot.main(["curves", str(tmp_path), "--out", str(tmp_path / "x.png")]), capsys)
    assert "has no train or test records" in line
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("loss", ['"0.5"', '{"a": 1}', "[0.5, 0.4]"], ids=["string", "dict", "list"])
def test_a_log_whose_loss_is_not_a_number_is_one_line(tmp_path, capsys, loss):
    (tmp_path / "log.jsonl").write_text(f'{{"iter": 1, "split": "train", "loss": {loss}}}\n')
    line = refused(lambda: plot.main(["curves", str(tmp_path), "--out", str(tmp_path / "x.png")]), capsys)
    assert "the train record of step 1 has loss" in line and "not a number" in line
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("samples, said", [
    ('[{"kl": 1, "reward": 0.5}]', "not {model: [samples]}"),
    ('{"dpo": [{"reward": 0.5}]}', "kl or reward is not a number"),
    ('{"dpo": [{"kl": 1.0, "reward": "high"}]}', "kl or reward is not a number"),
], ids=["samples_a_list", "no_kl", "string_reward"])
def test_a_frontier_file_that_is_not_samples_is_one_line(tmp_path, capsys, samples, said):
    (tmp_path / "results.json").write_text(f'{{"samples": {samples}}}')
    line = refused(lambda: plot.main(["frontier", str(tmp_path / "results.json"), "--out", str(tmp_path / "x.png")]),
                   capsys)
    assert said in line and not (tmp_path / "x.png").exists()


def test_an_out_that_cannot_be_written_is_one_line(tmp_path, capsys):
    run = write_dpo_log(tmp_path / "run")
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o555)
    target = read_only if not os.access(read_only, os.W_OK) else "/proc/nanodpo-test"  # root: a read-only fs
    line = refused(lambda: plot.main(["curves", str(run), "--out", f"{target}/x.png"]), capsys)
    assert "cannot write --out" in line


def test_the_dpo_panels_are_dpo_pys_metrics():
    assert plot.METRICS is dpo.METRICS  # one list: what dpo.py logs is what plot.py draws


def test_hline_needs_a_number(tmp_path, capsys):
    run = write_dpo_log(tmp_path / "run")
    line = refused(lambda: plot.main(["curves", str(run), "--hline", "floor", "--out", str(tmp_path / "x.png")]), capsys)
    assert "--hline 'floor'" in line


def test_loss_curves_are_dpo_loss_and_its_pull(tmp_path):
    beta_h = [-2.0, 0.0, math.log(9), 5.0]
    curves = plot.loss_curves(beta_h, smoothing=(0.0, 0.1))
    loss, pull = curves[0.0]
    assert loss == pytest.approx([math.log1p(math.exp(-x)) for x in beta_h])  # -log sigmoid(x)
    assert pull == pytest.approx([1 / (1 + math.exp(x)) for x in beta_h])     # sigmoid(-x)
    assert all(p > 0 for p in pull)  # plain DPO always pulls h up, however large it already is
    _, pull = curves[0.1]
    assert pull[2] == pytest.approx(0.0, abs=1e-12)  # conservative DPO stops at ln((1 - eps) / eps) = ln 9
    assert pull[1] > 0 > pull[3]  # ... and pushes back beyond it
    plot.main(["losses", "--out", str(tmp_path / "losses.png")])
    assert (tmp_path / "losses.png").read_bytes()[:8] == PNG_MAGIC
