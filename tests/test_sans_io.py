"""The protocol core stays sans-IO: no module under backchannel/_proto imports an I/O library.

An AST walk (not a ``sys.modules`` check, which breaks as soon as some ``__init__`` imports trio)
over every ``.py`` file in the package, including imports nested in functions and
``TYPE_CHECKING`` blocks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import backchannel._proto

FORBIDDEN = frozenset({"trio", "socket", "ssl", "asyncio", "selectors", "trio_websocket"})
PROTO_DIR = Path(backchannel._proto.__file__).parent


def forbidden_imports(source: str, filename: str = "<test>") -> list[str]:
    """Every forbidden module that ``source`` imports, as "line: module"."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module is not None:
            names = [node.module]  # relative imports (level > 0) stay inside the package
        else:
            continue
        found.extend(f"{node.lineno}: {name}" for name in names if name.split(".")[0] in FORBIDDEN)
    return found


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.rglob("*.py"))


def test_the_walk_sees_the_whole_package() -> None:
    names = {path.name for path in proto_files()}
    assert {"__init__.py", "_frames.py", "_mux.py", "_streamstate.py", "_events.py"} <= names


@pytest.mark.parametrize("path", proto_files(), ids=lambda path: path.name)
def test_proto_module_imports_no_io_library(path: Path) -> None:
    assert forbidden_imports(path.read_text(encoding="utf-8"), str(path)) == []


@pytest.mark.parametrize(
    "source",
    [
        "import trio",
        "import socket",
        "import ssl",
        "import asyncio",
        "import selectors",
        "import trio_websocket",
        "import trio.lowlevel",
        "import asyncio.streams as s",
        "import json, socket",
        "from trio import Nursery",
        "from trio.abc import Stream",
        "from ssl import SSLContext",
        "from asyncio.events import get_running_loop",
        "def f():\n    import trio\n",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import trio\n",
        "try:\n    import ssl\nexcept ImportError:\n    pass\n",
    ],
)
def test_checker_catches_forbidden_import(source: str) -> None:
    assert forbidden_imports(source) != []


@pytest.mark.parametrize(
    "source",
    [
        "import json",
        "import struct",
        "from . import _frames",
        "from ._errors import ProtocolError",
        "import triolet",
        "import sslib",
        "from socketserver_like import x",
    ],
)
def test_checker_allows_harmless_import(source: str) -> None:
    assert forbidden_imports(source) == []
