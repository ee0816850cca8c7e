"""The documentation that is generated from the code stays generated: docs/results.md's CSV
schema is `list tables --markdown`, and the README stays a first read with the test line CI runs."""

from __future__ import annotations

import re
from pathlib import Path

from capsbench.cli import list_tables, markdown_rows

ROOT = Path(__file__).resolve().parent.parent


def test_the_results_doc_schema_is_the_table_registry():
    text = (ROOT / "docs" / "results.md").read_text()
    block = re.search(r"<!-- tables:begin -->\n(.*?)<!-- tables:end -->", text, re.S)
    assert block, "docs/results.md lost its tables:begin / tables:end markers"
    assert block.group(1).strip() == markdown_rows(list_tables()).strip(), (
        "docs/results.md's CSV schema differs from the registry: regenerate it with "
        "`python -m capsbench list tables --markdown`")  # fmt: skip


def test_the_readme_is_a_first_read_with_the_test_line_ci_runs():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200
    marker = lines.index("<!-- test-line -->")
    assert "pytest" in lines[marker + 1] and "<!-- test-line -->" in (ROOT / ".ci" / "run").read_text()
    for link in re.findall(r"\]\((docs/[^)#]+)", "\n".join(lines)):
        assert (ROOT / link).is_file(), link
