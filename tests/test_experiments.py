"""experiments/: each module's figure from a small record of its shape (the experiments themselves run for
minutes to hours; their numbers are checked by tests/test_tables.py and tests/test_claims.py)."""
from experiments import beta_frontier, sft_length

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_the_sft_length_figures(tmp_path):
    runs = [{"sft_steps": n, "seed": s, "gain": 0.1 + s / 10, "sft_length": 20.0, "dpo_length": 21.0 + s,
             "sft_curve": [[0, 10.8], [n, 1.0 / n]]} for n in (10, 100) for s in (1, 2)]
    record = {"runs": runs, "lengths": (10, 100), "seeds": (1, 2), "floor": {"choices": 50, "tokens": 20.0, "nats": 0.2}}
    sft_length.draw_gain(record, str(tmp_path / "gain.png"))
    sft_length.draw_curves(record, str(tmp_path / "curves.png"))
    for name in ("gain.png", "curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC


def test_the_beta_figure(tmp_path):
    def point(x):
        return {"reward": 0.1 * x, "reward_se": 0.05, "kl": x, "length": 20.0 + x}
    points = {"sft": [point(0), point(0)], **{f"beta0.1@{step}": [point(step / 10), point(step / 8)] for step in (20, 40)}}
    record = {"families": {"beta0.1": []}, "steps": (20, 40), "seeds": (1, 2), "prompts": 8, "points": points}
    beta_frontier.draw(record, str(tmp_path / "beta.png"))
    assert (tmp_path / "beta.png").read_bytes()[:8] == PNG_MAGIC
