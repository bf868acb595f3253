"""Where SAP's pyrfc is importable the connector uses it for backends (``backend = "auto"``).

SAP's pyrfc cannot be installed here (it needs the licensed NW RFC SDK), so a stand-in module
named ``pyrfc`` plays it: its own exception classes (same names and fields as pyrfc's, not
ours) and a ``Connection`` that takes ``ashost`` + ``sysnr``/``gwserv`` like the real one (no
``port``), talking to the stub system underneath.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest

from backchannel import HostPort
from backchannel_rfc import _connection, _errors
from backchannel_rfc._backend import connection_parameters, load_client_module
from backchannel_rfc._errors import ABAPApplicationError
from tests.rfc_harness import in_thread, rfc_setup

pytestmark = pytest.mark.integration


def fake_pyrfc() -> types.ModuleType:
    """A module shaped like pyrfc, with exception classes of its own."""
    module = types.ModuleType("pyrfc")
    module.opened = []  # type: ignore[attr-defined]
    module.instances = []  # type: ignore[attr-defined]

    class RFCError(Exception):
        pass

    class RFCLibError(RFCError):
        def __init__(self, message: str, code: int, key: str, *rest: str) -> None:
            super().__init__(message)
            self.message, self.code, self.key = message, code, key
            names = ("msg_class", "msg_type", "msg_number", "msg_v1", "msg_v2", "msg_v3", "msg_v4")
            for name, value in zip(names, rest, strict=False):
                setattr(self, name, value)

    classes: dict[str, type[Exception]] = {"RFCError": RFCError, "RFCLibError": RFCLibError}
    for name in ("ABAPApplicationError", "LogonError", "CommunicationError"):
        classes[name] = type(name, (RFCLibError,), {})
    for name, cls in classes.items():
        setattr(module, name, cls)

    def translate(exc: _errors.RFCLibError) -> Exception:
        cls = classes.get(type(exc).__name__, RFCLibError)
        fields = [exc.msg_class, exc.msg_type, exc.msg_number, exc.msg_v1, exc.msg_v2]
        return cls(str(exc.message), int(exc.code or 0), str(exc.key), *map(str, fields))

    class Connection:
        def __init__(self, config: dict[str, Any] | None = None, **params: str) -> None:
            assert "port" not in params, "real pyrfc has no port parameter"
            module.opened.append(params)
            module.instances.append(self)
            try:
                self._inner = _connection.Connection(config, **params)
            except _errors.RFCLibError as exc:
                raise translate(exc) from None

        def __getattr__(self, name: str) -> Any:
            attribute = getattr(self._inner, name)
            if not callable(attribute):
                return attribute

            def wrapped(*args: Any, **kwargs: Any) -> Any:
                try:
                    return attribute(*args, **kwargs)
                except _errors.RFCLibError as exc:
                    raise translate(exc) from None

            return wrapped

    module.Connection = Connection  # type: ignore[attr-defined]
    return module


def test_auto_prefers_pyrfc_and_stub_is_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyrfc", None)  # import pyrfc -> ImportError
    assert load_client_module("auto")[0] == "stub"
    with pytest.raises(ImportError, match="install the SAP NW RFC SDK"):
        load_client_module("pyrfc")
    module = fake_pyrfc()
    monkeypatch.setitem(sys.modules, "pyrfc", module)
    assert load_client_module("auto") == ("pyrfc", module)
    assert load_client_module("stub")[0] == "stub"


def test_pyrfc_is_addressed_by_sysnr_or_gwserv() -> None:
    logon = {"client": "100"}
    params = connection_parameters("pyrfc", HostPort("erp", 3302), logon)
    assert params == {"ashost": "erp", "client": "100", "sysnr": "02"}
    assert connection_parameters("pyrfc", HostPort("erp", 4800), logon)["gwserv"] == "4800"
    assert connection_parameters("stub", HostPort("erp", 4800), logon)["port"] == "4800"


async def test_the_connector_calls_through_pyrfc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = fake_pyrfc()
    monkeypatch.setitem(sys.modules, "pyrfc", module)
    async with rfc_setup(
        tmp_path,
        connector_plugin={"backend": "auto"},
        functions=[{"name": "STFC_CONNECTION"}, {"name": "Z", "match": "prefix"}],
    ) as setup:

        def run() -> tuple[str, ABAPApplicationError]:
            with setup.connect() as connection:
                text: str = connection.call("STFC_CONNECTION", REQUTEXT="via pyrfc")["ECHOTEXT"]
                with pytest.raises(ABAPApplicationError) as info:
                    connection.call("Z_NOT_THERE")
                return text, info.value

        text, error = await in_thread(run)
    assert text == "via pyrfc"
    # pyrfc's own exception class arrived as ours, with its code and key.
    assert error.key == "FU_NOT_FOUND"
    assert error.code == 5
    assert [p.get("gwserv") for p in module.opened] == [str(setup.stub_port)]
    # The pooled connection was logged off when the connector stopped.
    assert [c.alive for c in module.instances] == [False]
