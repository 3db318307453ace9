"""benchmarks/gpu_check.py, as far as a CPU can take it: every stage but the tests and compilation at
toy shapes, the summary it writes, the JUnit counting of the tests stage, and its bad-input lines."""
import json
import os

import pytest

from benchmarks import gpu_check


def test_tiny_run_writes_a_sane_summary(tmp_path):
    gpu_check.main(["--out", str(tmp_path), "--tiny", "--device", "cpu", "--skip", "tests,compile"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    markdown = (tmp_path / "summary.md").read_text()
    jobs = {(job["stage"], job["name"]): job for job in summary["jobs"]}
    assert set(stage for stage, _ in jobs) == {"eager", "memory", "torchrun"}  # the skipped stages left out
    assert all(job["status"] == "ok" for (stage, _), job in jobs.items() if stage != "torchrun"), summary["jobs"]
    assert jobs["torchrun", "dpo.py on 1 and 2 GPUs"]["status"] == "skipped"
    assert "needs 2 GPUs" in jobs["torchrun", "dpo.py on 1 and 2 GPUs"]["reason"]

    stacked = jobs["eager", "gpt2 stacked"]["result"]
    packed = jobs["eager", "gpt2 packed"]["result"]
    assert [s["step"] for s in stacked["steps"]] == ["sft", "dpo"] and [s["step"] for s in packed["steps"]] == ["dpo"]
    assert stacked["response_frac"] == gpu_check.HH_RESPONSE_FRAC and packed["share_prompt"]
    stacked_dpo, packed_dpo = stacked["steps"][1], packed["steps"][0]
    # 2 pairs of a 23-token prompt and two 10-token responses: 2 x 32 tokens stacked, 23 + 9 + 9 packed
    assert (stacked_dpo["model_tokens"], packed_dpo["model_tokens"]) == (128, 82)
    for step in stacked["steps"] + packed["steps"]:
        assert step["ms"] > 0 and 0 < step["mfu"] == pytest.approx(step["tflops"])  # --peak_tflops 1 in tiny mode
    [comparison] = summary["share_prompt"]
    assert comparison["packed_over_stacked"] == pytest.approx(packed_dpo["ms"] / stacked_dpo["ms"])

    # the activation count of the memory table, exact on a CPU; the peaks need CUDA to be measured
    assert jobs["memory", "saved activations gpt2"]["result"]["ratio"] == 1
    live = jobs["memory", "gpt2 reference live"]["result"]
    assert live["measured_bytes"] is None and live["computed_bytes"] > jobs["memory", "gpt2 --precompute_ref"]["result"]["computed_bytes"]
    assert "| gpt2 | no | packed | dpo |" in markdown and "## Memory: measured against computed" in markdown
    assert sorted(os.listdir(tmp_path)) == ["gpu_check.log", "summary.json", "summary.md"]  # all a device returns
    assert "===== eager: gpt2 packed" in (tmp_path / "gpu_check.log").read_text()


def test_a_job_over_the_budget_is_skipped_not_run(tmp_path):
    summary = gpu_check.main(["--out", str(tmp_path), "--tiny", "--device", "cpu", "--skip",
                              "tests,eager,memory,compile", "--budget_s", "0"])
    [job] = summary["jobs"]
    assert job["status"] == "skipped" and job["reason"].startswith("time budget")


def test_junit_counts(tmp_path):
    report = tmp_path / "report.xml"
    report.write_text("""<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
        <testcase classname="tests.test_cuda" name="test_a"/>
        <testcase classname="tests.test_cuda" name="test_b"><failure message="assert 0.2 &lt; 0.1&#10;more">...</failure></testcase>
        <testcase classname="tests.test_cuda" name="test_c"><skipped message="needs a CUDA GPU"/></testcase>
        <testcase classname="tests.test_cuda" name="test_d"><error message="fixture broke"/></testcase>
        </testsuite></testsuites>""")
    counts = gpu_check.junit_counts(report)
    assert (counts["passed"], counts["failed"], counts["skipped"]) == (1, 2, 1)
    assert counts["failures"] == [("tests.test_cuda::test_b", "assert 0.2 < 0.1"), ("tests.test_cuda::test_d", "fixture broke")]


@pytest.mark.parametrize("flags, message", [
    (["--skip", "tests,benches"], "--skip benches: the stages are tests, eager, memory, compile, torchrun"),
    (["--device", "cpu"], "--device cpu needs --tiny"),
])
def test_bad_flags_are_one_line(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--out", str(tmp_path)] + flags)
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
