"""The import graph points one way: faces (app/, hmtqa/) -> qa_pipeline -> hmt.

Every module of the lower layers is parsed (not imported), and every import in it is checked,
including lazy ones inside functions, ``if TYPE_CHECKING:`` blocks and
``importlib.import_module("...")`` with a literal name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FACES = ("app", "hmtqa")
# Each layer and the top-level packages it must never import.
FORBIDDEN = {
    "hmt": ("qa_pipeline", *FACES),
    "qa_pipeline": FACES,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import anywhere in ``source``, relative ones resolved."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.append((node.lineno, name))
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__"))
            )
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def violations(layer: str) -> list[str]:
    bad = []
    for path in sorted((ROOT / layer).rglob("*.py")):
        module = module_name(path)
        for line, name in imported_modules(path.read_text(encoding="utf-8"), module, path.name == "__init__.py"):
            if name.split(".")[0] in FORBIDDEN[layer]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: imports {name}")
    return bad


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_only_downwards(layer):
    assert len(list((ROOT / layer).rglob("*.py"))) > 3, f"{layer}/ not found"
    assert violations(layer) == []


def test_checker_sees_lazy_relative_and_dynamic_imports():
    source = (
        "import os\n"
        "def f():\n"
        "    from app.server import serve\n"
        "    from ..hmtqa import main\n"
        "    import importlib\n"
        "    importlib.import_module('hmtqa.qa')\n"
        "class C:\n"
        "    def g(self):\n"
        "        from . import engine\n"
    )
    names = {name for _, name in imported_modules(source, "qa_pipeline.documents.pdf")}
    assert names == {"os", "app.server", "qa_pipeline.hmtqa", "importlib", "hmtqa.qa", "qa_pipeline.documents"}
    names = [name for _, name in imported_modules("from . import engine\n", "qa_pipeline", is_package=True)]
    assert names == ["qa_pipeline"]
