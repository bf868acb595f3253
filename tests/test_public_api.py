"""The public API: what ``backchannel`` exports, that it is documented, and that plugins and
examples use nothing else."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import backchannel

ROOT = Path(__file__).parents[1]
INIT = ROOT / "core" / "backchannel" / "__init__.py"

#: Exported values that are not classes or functions: documented where they are defined.
DATA = {"__version__", "hookimpl", "DemoStep"}

#: Code that must use only the public API: the built-in plugins, the fixture plugin, examples.
PUBLIC_API_USERS = sorted(
    [
        *ROOT.glob("plugins/*/*/**/*.py"),
        *ROOT.glob("tests/fixtures/upper_plugin/**/*.py"),
        *ROOT.glob("examples/**/*.py"),
    ]
)


def exports() -> list[tuple[str, str, str | None]]:
    """(module, name, alias) for each import in backchannel/__init__.py."""
    tree = ast.parse(INIT.read_text(encoding="utf-8"))
    found: list[tuple[str, str, str | None]] = []
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the module docstring
        assert isinstance(node, ast.ImportFrom), (
            f"line {node.lineno}: __init__.py holds only `from ._x import Y as Y` re-exports"
        )
        assert node.level == 1
        assert node.module is not None
        found.extend((node.module, alias.name, alias.asname) for alias in node.names)
    return found


def test_every_name_is_exported_once_with_the_redundant_alias() -> None:
    names = [name for _, name, _ in exports()]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    for module, name, alias in exports():
        assert alias == name, f"from .{module} import {name} must say `as {name}`"
        assert module.startswith("_") or module == "hookspecs", module
        assert name == "__version__" or not name.startswith("_"), name


def test_the_module_namespace_is_exactly_the_exports() -> None:
    # Submodules (hookspecs, for one) are bound as a side effect of being imported.
    public = {
        name
        for name, value in vars(backchannel).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert public == {name for _, name, _ in exports()} - {"__version__"}


@pytest.mark.parametrize("name", sorted(name for _, name, _ in exports()))
def test_every_export_has_its_own_docstring(name: str) -> None:
    value = getattr(backchannel, name)
    if name in DATA:
        assert not inspect.isclass(value)
        assert not inspect.isfunction(value)
        return
    assert inspect.isclass(value) or inspect.isfunction(value), name
    # From the source, not __doc__: dataclasses make one up when the class has none.
    source = inspect.getsource(value)
    definition = ast.parse(inspect.cleandoc("\n" + source) if source[0].isspace() else source)
    node = definition.body[0]
    assert isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
    assert ast.get_docstring(node), f"{name} has no docstring"


def private_backchannel_imports(path: Path) -> list[str]:
    """Imports of ``backchannel._x`` (or of private names from ``backchannel``) in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    problems: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            problems.extend(
                f"line {node.lineno}: import {alias.name}"
                for alias in node.names
                if alias.name.startswith("backchannel._")
            )
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("backchannel._"):
                problems.append(f"line {node.lineno}: from {node.module} import ...")
            elif node.module == "backchannel":
                problems.extend(
                    f"line {node.lineno}: from backchannel import {alias.name}"
                    for alias in node.names
                    if alias.name.startswith("_") and alias.name != "__version__"
                )
    return problems


def test_public_api_users_are_found() -> None:
    names = {path.relative_to(ROOT).as_posix() for path in PUBLIC_API_USERS}
    assert "plugins/tcp/backchannel_tcp/_plugin.py" in names
    assert "tests/fixtures/upper_plugin/backchannel_upper/plugin.py" in names
    assert "examples/embed_gateway_and_connector.py" in names


@pytest.mark.parametrize(
    "path", PUBLIC_API_USERS, ids=[p.relative_to(ROOT).as_posix() for p in PUBLIC_API_USERS]
)
def test_plugins_and_examples_import_only_the_public_api(path: Path) -> None:
    assert private_backchannel_imports(path) == []


def test_the_check_catches_private_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import backchannel._stream\n"
        "from backchannel._pki import TlsMaterial\n"
        "from backchannel import _config, HostPort\n"
        "from backchannel import __version__\n"
    )
    assert private_backchannel_imports(sample) == [
        "line 1: import backchannel._stream",
        "line 2: from backchannel._pki import ...",
        "line 3: from backchannel import _config",
    ]


def test_the_core_never_imports_a_plugin() -> None:
    for path in sorted((ROOT / "core" / "backchannel").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                assert not module.startswith("backchannel_"), f"{path}:{node.lineno}: {module}"
