"""The README and the docs as users read them: short, absolute links where PyPI renders them, nothing but the product.
(Their code blocks run as tests of their own: see the repository's conftest.py.)"""

import re
from pathlib import Path

import pytest

from ttreg_cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]

# how the package was made is no user's business: who made it, on which machines, in which work items
DEVELOPMENT = re.compile(
    r"\bsessions?\b|\.\./shared|\bissues? #?\d+|#\d{1,3}\b|\bengineers?\b|\blent\b|build machine|CI-class|this project's",
    re.IGNORECASE,
)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)|^\s*\[[^\]]+\]:\s*(\S+)|\b(?:src|href)=[\"']([^\"']+)", re.MULTILINE)


def links(text: str) -> list[str]:
    return [next(group for group in match.groups() if group) for match in LINK.finditer(text)]


def test_the_readme_is_short():
    assert len(README.read_text().splitlines()) < 200


def test_the_readmes_links_are_absolute():
    """PyPI renders the README as the package's long description, where a relative link leads nowhere."""
    found = links(README.read_text())
    assert found, "no link found: the pattern is broken"
    assert [link for link in found if not link.startswith(("https://", "#"))] == []


def test_the_readmes_links_into_the_repository_name_files_it_has():
    """The README links to the docs and the figure by absolute URLs; each must name a file of this checkout."""
    prefixes = (
        "https://github.com/ttreg-hf/ttreg_hf/blob/main/",
        "https://raw.githubusercontent.com/ttreg-hf/ttreg_hf/main/",
    )
    paths = [link.removeprefix(p) for link in links(README.read_text()) for p in prefixes if link.startswith(p)]
    assert len(paths) >= 5
    assert [path for path in paths if not (ROOT / path.partition("#")[0]).is_file()] == []


def test_links_are_found_in_every_form():
    text = "[a](docs/a.md) ![b](assets/b.png) <img src='d.png'> [e](https://x.org/e)\n[c]: c.md\n"
    assert sorted(links(text)) == ["assets/b.png", "c.md", "d.png", "docs/a.md", "https://x.org/e"]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_the_docs_speak_of_the_product_only(page):
    assert DEVELOPMENT.findall(page.read_text()) == []


def test_the_cli_help_and_the_model_cards_speak_of_the_product_only():
    parser = build_parser()
    helps = [parser.format_help()]
    for action in parser._subparsers._group_actions:  # argparse keeps the subcommands' parsers here only
        helps += [sub.format_help() for sub in action.choices.values()]
    assert DEVELOPMENT.findall("\n".join(helps)) == []
    assert DEVELOPMENT.findall((ROOT / "ttreg_hf" / "model_card.py").read_text()) == []


def test_the_cli_reference_is_generated_from_the_parser():
    """docs/reference/cli.md holds a marker that the site's hook replaces with every command's help."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mkdocs_hooks", ROOT / "utils" / "mkdocs_hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    page = (ROOT / "docs" / "reference" / "cli.md").read_text()
    assert hooks.MARKER in page
    rendered = hooks.on_page_markdown(page, page=None)
    commands = ["find-neurons", "inspect", "demo", "export", "evaluate", "push-index"]
    assert [f"## ttreg {command}\n" in rendered for command in commands] == [True] * len(commands)
    assert "usage: ttreg find-neurons" in rendered and hooks.MARKER not in rendered
