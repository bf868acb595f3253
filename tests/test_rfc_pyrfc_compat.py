"""``install_as_pyrfc()``: pyrfc code runs unchanged against the stub where SAP's pyrfc is not
installed, and SAP's pyrfc is left alone where it is."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from backchannel_rfc._compat import PYRFC_API_LEVEL, install_as_pyrfc
from backchannel_rfc._connection import Connection
from backchannel_rfc._demo_data import demo_system
from backchannel_rfc._errors import ABAPApplicationError
from backchannel_rfc._stub_server import serve_stub
from tests.procs import child_environment

#: A pyrfc script as found in the wild: it knows nothing of the stub.
PYRFC_SCRIPT = """\
import sys

from pyrfc import ABAPApplicationError, Connection, LogonError, __version__

params = {
    "ashost": "127.0.0.1",
    "sysnr": "00",
    "gwserv": sys.argv[1],
    "client": "100",
    "user": "DEMO",
    "passwd": "welcome",
}
with Connection(**params) as conn:
    print(conn.call("STFC_CONNECTION", REQUTEXT="Hello SAP!")["ECHOTEXT"])
    try:
        conn.call("RFC_READ_TABLE", QUERY_TABLE="NO_SUCH_TABLE")
    except ABAPApplicationError as e:
        print(e.key)
try:
    Connection(**{**params, "passwd": "wrong"})
except LogonError as e:
    print(e.key)
print(__version__)
"""

#: What runs the script: install the stub as pyrfc, then the script as ``__main__``.
RUNNER = (
    "import runpy, sys;"
    "from backchannel_rfc._compat import install_as_pyrfc;"
    "install_as_pyrfc();"
    "sys.argv = sys.argv[1:];"
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)

REAL_PYRFC_INSTALLED = importlib.util.find_spec("pyrfc") is not None


@pytest.fixture
async def port() -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        bound: int = await nursery.start(serve_stub, demo_system(), "127.0.0.1", 0)
        yield bound
        nursery.cancel_scope.cancel()


@pytest.fixture
def no_pyrfc_module() -> Iterator[None]:
    """Whatever a test registers as ``pyrfc`` is gone afterwards."""
    saved = {n: m for n, m in sys.modules.items() if n == "pyrfc" or n.startswith("pyrfc.")}
    yield
    for name in [n for n in sys.modules if n == "pyrfc" or n.startswith("pyrfc.")]:
        del sys.modules[name]
    sys.modules.update(saved)


@pytest.mark.integration
@pytest.mark.skipif(REAL_PYRFC_INSTALLED, reason="SAP's pyrfc is installed: it would be used")
async def test_unchanged_pyrfc_script_runs_against_the_stub(port: int, tmp_path: Path) -> None:
    script = tmp_path / "pyrfc_script.py"
    script.write_text(PYRFC_SCRIPT, encoding="utf-8")
    with trio.fail_after(60):
        done = await trio.run_process(
            [sys.executable, "-c", RUNNER, str(script), str(port)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=child_environment(),
        )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().splitlines() == [
        "Hello SAP!",
        "TABLE_NOT_AVAILABLE",
        "RFC_LOGON_FAILURE",
        PYRFC_API_LEVEL,
    ]


@pytest.mark.skipif(REAL_PYRFC_INSTALLED, reason="SAP's pyrfc is installed: it would be used")
@pytest.mark.usefixtures("no_pyrfc_module")
def test_stub_module_has_pyrfc_public_names() -> None:
    module = install_as_pyrfc()
    assert sys.modules["pyrfc"] is module
    assert install_as_pyrfc() is module  # a second call finds the first
    assert module.Connection is Connection
    assert module.ABAPApplicationError is ABAPApplicationError
    assert module.__version__ == PYRFC_API_LEVEL
    assert sorted(module.__all__) == sorted(
        [
            "ABAPApplicationError",
            "ABAPRuntimeError",
            "CommunicationError",
            "Connection",
            "ExternalApplicationError",
            "ExternalAuthorizationError",
            "ExternalRuntimeError",
            "FunctionDescription",
            "LogonError",
            "RFCError",
            "RFCLibError",
            "RFCTypeError",
            "Server",
            "TypeDescription",
        ]
    )
    for name in module.__all__:
        assert getattr(module, name).__module__.startswith("backchannel_rfc.")


def _package(root: Path, init: str) -> None:
    (root / "pyrfc").mkdir()
    (root / "pyrfc" / "__init__.py").write_text(textwrap.dedent(init), encoding="utf-8")
    (root / "pyrfc" / "_exception.py").write_text("class RFCError(Exception): ...\n")


@pytest.mark.usefixtures("no_pyrfc_module")
def test_real_pyrfc_is_returned_untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _package(tmp_path, "from ._exception import RFCError\nREAL = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("pyrfc", None)
    module = install_as_pyrfc()
    assert module.REAL is True
    assert sys.modules["pyrfc"] is module
    assert not hasattr(module, "Server")


@pytest.mark.usefixtures("no_pyrfc_module")
def test_pyrfc_without_the_sdk_is_replaced_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SAP's pyrfc without the NW RFC SDK: its extension module fails after _exception loaded.
    _package(tmp_path, "from ._exception import RFCError\nfrom ._cyrfc import Connection\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("pyrfc", None)
    module = install_as_pyrfc()
    assert module.Connection is Connection
    assert "pyrfc._exception" not in sys.modules
