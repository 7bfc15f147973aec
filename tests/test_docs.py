"""The repository stands on its own: the method document the help cites is in it, and the README's
examples run on what the default sweep writes."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from qdm_engine.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "METHOD.md"


def all_help() -> str:
    """The top-level help and every subcommand's help, as a user sees them."""
    parser = build_parser()
    texts = [parser.format_help()]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            texts += [p.format_help() for p in action.choices.values()]
    return "\n".join(texts)


def method_sections() -> set[str]:
    return set(re.findall(r"^## (\d+)\.", METHOD.read_text(encoding="utf-8"), flags=re.M))


def test_method_document_is_in_the_repository():
    assert METHOD.is_file()
    assert method_sections() >= {str(n) for n in range(1, 12)}


@pytest.mark.parametrize("where", ["help", "README"])
def test_method_citations_name_the_repository_file(where):
    text = all_help() if where == "help" else (ROOT / "README.md").read_text(encoding="utf-8")
    text = re.sub(r"\s+", " ", text)  # argparse wraps lines anywhere
    cites = re.findall(r"(\S*)METHOD\.md", text)
    assert cites, f"the {where} does not point to the method document"
    assert all(c.endswith("docs/") for c in cites), cites


def test_cited_sections_exist():
    """Every 'METHOD.md section N' (or 'sections N and M') in the package and the help names a real section."""
    sources = [all_help()] + [p.read_text(encoding="utf-8") for p in (ROOT / "qdm_engine").rglob("*.py")]
    cited = set()
    for text in sources:
        flat = re.sub(r"\s+", " ", text)
        for ref in re.findall(r"METHOD\.md(?:'s)?\s+sections?\s+(\d+(?:\s*(?:,|and)\s*\d+)*)", flat):
            cited |= set(re.findall(r"\d+", ref))
    assert cited, "no section citations found"
    assert cited <= method_sections(), cited - method_sections()


def readme_commands() -> list[list[str]]:
    """Every `qdm-engine ...` command in the README's bash blocks, split into arguments (comments dropped)."""
    import shlex

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            args = shlex.split(line, comments=True)
            if args and args[0] == "qdm-engine":
                commands.append(args[1:])
    return commands


def test_readme_commands_parse():
    commands = readme_commands()
    assert len(commands) >= 10
    for args in commands:
        build_parser().parse_args(args)  # argparse exits (SystemExit) on a flag that does not exist


def test_readme_examples_run_on_the_default_run_folder():
    """The commands on RUN_DIR name only conditions that the default sweep (`sweep` with no flags) writes."""
    from qdm_engine.engine.compression import parse_bits

    from qdm_engine.cli import DEFAULT_BITS

    default_bits = build_parser().parse_args(["sweep"]).bits or DEFAULT_BITS  # None: resolved in _run_sweep
    conditions = {f"int{b}" for b in parse_bits(default_bits)}
    on_run = [args for args in readme_commands() if "RUN_DIR" in args]
    assert {args[0] for args in on_run} >= {"report", "predict", "overlap", "thresholds", "ppl"}
    for args in on_run:
        parsed = build_parser().parse_args(args)
        named = [getattr(parsed, flag, None) for flag in ("condition", "a", "b")]
        for value in named:
            for name in (value if isinstance(value, list) else [value]):
                if name is not None:
                    assert name in conditions, \
                        f"README: `qdm-engine {' '.join(args)}` names {name}, not in {conditions}"
