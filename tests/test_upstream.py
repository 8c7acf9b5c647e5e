"""The dependencies' internals we import are listed in one place, and all of them exist in the installed versions."""

import ast
from pathlib import Path

import ttreg_hf
from ttreg_hf.upstream import INTERNALS, missing_internals

PACKAGE = Path(ttreg_hf.__file__).parent
TOP_LEVEL_ONLY = {"transformers", "open_clip", "timm", "torch", "safetensors", "huggingface_hub", "accelerate"}


def imported_internals() -> set[str]:
    """Every ``from <dependency>.<submodule> import name`` in the package, as dotted names."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                root = node.module.split(".")[0]
                if root in {"transformers", "open_clip", "timm"} and node.module not in TOP_LEVEL_ONLY:
                    found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_every_internal_we_import_is_listed():
    listed = {name for names in INTERNALS.values() for name in names}
    assert imported_internals() - listed == set(), "add these to ttreg_hf/upstream.py INTERNALS"
    assert listed - imported_internals() == set(), (
        "remove these from ttreg_hf/upstream.py INTERNALS: nothing imports them"
    )


def test_every_listed_internal_exists_in_the_installed_versions():
    assert missing_internals() == [], "an upstream release moved these; see ttreg_hf/upstream.py"
