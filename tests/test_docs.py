"""Docs that are generated from code stay in sync with it."""

from pathlib import Path

from ptflow.config.schema import describe_fields

ROOT = Path(__file__).resolve().parents[1]


def test_config_reference_matches_schema():
    doc = (ROOT / "docs" / "config.md").read_text()
    assert describe_fields() in doc, "regenerate docs/config.md with `ptflow config-reference`"


def test_readme_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    for command in ('pip install -c constraints.txt -e ".[dev]"', "python -m pytest && python -m pytest -m integration"):
        assert command in readme and f"\n{command}\n" in ci
