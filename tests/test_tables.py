"""experiments/tables.py: every generated table and number in README.md and docs/ equals what results/ gives,
and a hand-edited one is caught."""
import re

import pytest

from experiments import tables


@pytest.mark.parametrize("path", tables.documents(), ids=lambda p: p.rsplit("/", 1)[-1])
def test_every_generated_table_and_number_matches_results(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert tables.differences(text, path) == [], "run python -m experiments.tables --write"


def test_the_readme_has_no_number_left_to_measure():
    with open(tables.documents()[0], encoding="utf-8") as f:
        text = f.read()
    assert "(to measure)" not in text
    assert len(tables.BLOCK.findall(text)) >= 20  # the README's numbers are generated, not typed


def test_a_hand_edited_number_is_caught():
    with open(tables.documents()[0], encoding="utf-8") as f:
        text = f.read()
    match = re.search(r"<!-- number demo.gain -->(.*?)<!-- /number -->", text)
    assert match, "the README no longer shows demo.gain"
    edited = text.replace(match.group(0), "<!-- number demo.gain -->0.99 ± 0.01<!-- /number -->")
    assert tables.differences(edited) == ["demo.gain"]
    table = re.search(r"<!-- table demo -->(.*?)<!-- /table -->", text, re.S).group(0)
    digit = re.search(r"\d\.\d\d\d", table).group(0)
    edited = text.replace(table, table.replace(digit, "9.999", 1))
    assert tables.differences(edited) == ["demo"]


def test_an_unknown_name_is_refused_in_one_line():
    with pytest.raises(KeyError, match="no number named 'no-such-thing'"):
        tables.render("<!-- number no-such-thing -->1<!-- /number -->")


def test_the_check_command_exits_non_zero_naming_what_differs(tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text("gain <!-- number demo.gain -->0<!-- /number -->\n", encoding="utf-8")
    monkeypatch.setattr(tables, "documents", lambda: [str(readme)])
    with pytest.raises(SystemExit, match="README.md: demo.gain"):
        tables.main(["--check"])
    tables.main(["--write"])
    assert readme.read_text(encoding="utf-8") == f"gain <!-- number demo.gain -->{tables.demo_gain()}<!-- /number -->\n"
    tables.main(["--check"])  # now in step: no exit
