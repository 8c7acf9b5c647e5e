"""The package's layers, read from the source: every import (at module level or inside a function) points down or
sideways, never up, and no two modules import each other, however lazily.

    core  <-  families  <-  registry  <-  applications  <-  the package (`ttreg_hf/__init__.py`)

A new module is given its layer here, or this test fails: the layering cannot rot unnoticed.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ttreg_hf"

LAYERS = {
    "core": (
        "version",
        "errors",
        "settings",
        "index",
        "images",
        "family",
        "upstream",
        "remote_code",
        "configs",
        "configs.registers",
        "configs.clip",
        "configs.dinov2",
        "configs.dinov3",
        "configs.hosts",
        "configs.siglip",
        "configs.vit",
        "modeling",
        "modeling.layout",
        "modeling.edit",
        "modeling.registers",
        "modeling.attention",
        "modeling.sites",
    ),
    "families": (
        "modeling.dinov2",
        "modeling.dinov2_original",
        "modeling.clip",
        "modeling.siglip",
        "modeling.vit",
        "modeling.dinov3",
        "modeling.open_clip",
        "modeling.timm",
        "modeling.timm_registry",
        "modeling.hosts",
    ),
    "registry": ("registry", "modeling.vlm", "modeling.llava"),
    "applications": (
        "hub",
        "planted",
        "discovery",
        "report",
        "export",
        "export_open_clip",
        "model_card",
        "analysis",
        "analysis.attention",
        "analysis.capture",
        "analysis.distributed",
        "analysis.interventions",
        "analysis.metrics",
        "analysis.towers",
        "evaluation",
        "evaluation.boxes",
        "evaluation.data",
        "evaluation.evaluate",
        "evaluation.figure",
        "evaluation.statistics",
        "evaluation.zero_shot",
    ),
    "package": ("", "__main__"),
}
RANK = {module: rank for rank, modules in enumerate(LAYERS.values()) for module in modules}
NAMES = list(LAYERS)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


GENERATED = PACKAGE / "remote"  # the remote code, written by utils/generate_remote_code.py: self-contained files
MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py")) if GENERATED not in path.parents}


def imported_modules(name: str, source: str | None = None) -> set[str]:
    """The package's modules that module ``name`` (with ``source``, default: its file's) imports anywhere, relative
    names resolved; ``from . import x`` is the module ``x`` when there is one, else the package itself (``""``)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text() if source is None else source)
    type_only = {  # `if TYPE_CHECKING:` imports never run: they name types, for annotations
        id(child) for node in ast.walk(tree) if _is_type_checking(node) for child in ast.walk(node)
    }
    for node in (node for node in ast.walk(tree) if id(node) not in type_only):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names if alias.name.split(".")[0] == "ttreg_hf"]
            found.update(target.removeprefix("ttreg_hf").lstrip(".") for target in targets)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            elif node.module and node.module.split(".")[0] == "ttreg_hf":
                module = node.module.removeprefix("ttreg_hf").lstrip(".")
            else:
                continue
            for alias in node.names:
                submodule = f"{module}.{alias.name}".lstrip(".")
                found.add(submodule if submodule in MODULES else module)
    return found - {name}


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


GRAPH = {name: imported_modules(name) for name in MODULES}


def test_every_module_has_a_layer():
    assert sorted(set(MODULES) - set(RANK)) == [], "give each new module its layer in LAYERS"
    assert sorted(set(RANK) - set(MODULES)) == [], "remove the modules that are gone from LAYERS"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down(name):
    upward = [f"{target} ({NAMES[RANK[target]]})" for target in GRAPH[name] if RANK[target] > RANK[name]]
    assert upward == [], f"{name or 'ttreg_hf'} ({NAMES[RANK[name]]}) imports a higher layer: {', '.join(upward)}"


def test_no_import_cycles():
    cycles, done = [], set()

    def visit(name: str, stack: list[str]) -> None:
        if name in stack:
            cycles.append(" -> ".join([*stack[stack.index(name) :], name]))
            return
        if name in done:
            return
        for target in sorted(GRAPH[name]):
            visit(target, [*stack, name])
        done.add(name)

    for name in sorted(MODULES):
        visit(name, [])
    assert cycles == []


def test_the_reader_sees_lazy_relative_and_absolute_imports():
    """A planted upward import is seen wherever it hides: inside a function, relative or absolute."""
    lazy = "def late():\n    from ..hub import load_tt_model\n"
    assert imported_modules("modeling.vit", lazy) == {"hub"}
    assert imported_modules("modeling.vit", "import ttreg_hf.hub\n") == {"hub"}
    assert imported_modules("modeling.vit", "from ttreg_hf import discovery\n") == {"discovery"}
    assert imported_modules("modeling.vit", "from .. import __version__\n") == {""}  # the package: the top layer
    assert imported_modules("analysis.capture", "from . import metrics\n") == {"analysis.metrics"}
    assert imported_modules("modeling.vit", "if TYPE_CHECKING:\n    from ..hub import load_tt_model\n") == set()


TESTS = Path(__file__).resolve().parent


def test_no_test_module_imports_another():
    """Test modules share helpers through the support modules (`support`, `family_models`, ...), never by importing
    one another: a test module is run, not used."""
    found = []
    for path in sorted(TESTS.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            found += [f"{path.name} imports {name}" for name in names if name.split(".")[0].startswith("test_")]
    assert found == []
