"""MkDocs hook: the command-line reference is generated from `ttreg_cli.build_parser` at build time, so that it is
the help `ttreg` prints (docs/reference/cli.md holds the prose and a ``<!-- ttreg-cli-reference -->`` marker)."""

import argparse
import os
import sys
from pathlib import Path

MARKER = "<!-- ttreg-cli-reference -->"
ROOT = Path(__file__).resolve().parents[1]


def cli_reference() -> str:
    """One section per command: its help as ``ttreg COMMAND --help`` prints it, 100 columns wide."""
    sys.path.insert(0, str(ROOT))
    os.environ["COLUMNS"] = "100"  # argparse wraps at the terminal's width
    from ttreg_cli import build_parser

    parser = build_parser()
    sections = ["## ttreg\n", f"```text\n{parser.format_help()}```\n"]
    for action in parser._subparsers._group_actions:  # argparse keeps the subcommands' parsers here only
        if isinstance(action, argparse._SubParsersAction):
            for name, command in action.choices.items():
                sections += [f"## ttreg {name}\n", f"```text\n{command.format_help()}```\n"]
    return "\n".join(sections)


def on_page_markdown(markdown: str, page, **kwargs) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, cli_reference())
    return markdown
