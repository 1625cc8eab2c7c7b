"""Docs that promise behaviour are checked against the code that provides it."""

from __future__ import annotations

import re
import sys

from conftest import ROOT

from prefork.config import settings_table

TABLE = re.compile(r"(checks it -->\n)(.*?)(<!-- end of settings table -->)", re.S)


def test_cli_doc_settings_table_is_current() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    table = TABLE.search(doc)
    assert table, "docs/configuration.md lost its settings table markers"
    assert table.group(2) == settings_table(), "regenerate: python tests/test_docs.py --write"


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(
        r"<!-- ci: the next command is what \.ci/run runs -->\n```sh\n#[^\n]*\n"
        r"([^\n]+)\n```",
        readme,
    )
    assert block, "README lost the marked test command"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "ci: the next command is what .ci/run runs" in ci  # .ci/run reads it from README
    assert "python -m pytest" in block.group(1) and '".[test]"' in block.group(1)


def test_signals_doc_names_every_master_signal() -> None:
    doc = (ROOT / "docs" / "signals.md").read_text()
    for name in ("TERM", "INT", "QUIT", "TTIN", "TTOU", "HUP", "USR1", "USR2", "CHLD"):
        assert f"`{name}`" in doc, name


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    path = ROOT / "docs" / "configuration.md"
    path.write_text(
        TABLE.sub(lambda m: m.group(1) + settings_table() + m.group(3), path.read_text())
    )
