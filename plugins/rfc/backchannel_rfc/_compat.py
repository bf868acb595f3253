"""``install_as_pyrfc()``: make ``import pyrfc`` give the stub, so pyrfc code runs unchanged
against the stub system (or through backchannel) where SAP's pyrfc is not installed."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

from ._connection import Connection
from ._descriptions import FunctionDescription, TypeDescription
from ._errors import (
    ABAPApplicationError,
    ABAPRuntimeError,
    CommunicationError,
    ExternalApplicationError,
    ExternalAuthorizationError,
    ExternalRuntimeError,
    LogonError,
    RFCError,
    RFCLibError,
    RFCTypeError,
)
from ._server import Server

#: The pyrfc release whose API the stub follows; the stub module's ``__version__``.
PYRFC_API_LEVEL = "3.3.1"

_EXPORTS: tuple[type, ...] = (
    Connection,
    Server,
    ABAPApplicationError,
    ABAPRuntimeError,
    LogonError,
    CommunicationError,
    ExternalRuntimeError,
    ExternalApplicationError,
    ExternalAuthorizationError,
    RFCError,
    RFCLibError,
    RFCTypeError,
    FunctionDescription,
    TypeDescription,
)


def install_as_pyrfc() -> ModuleType:
    """SAP's ``pyrfc`` if it can be imported (nothing else happens then); otherwise a module
    ``pyrfc`` registered in ``sys.modules`` whose public names are the stub's classes."""
    try:
        return importlib.import_module("pyrfc")
    except ImportError:
        # pyrfc installed without the NW RFC SDK fails half-way: drop what it left behind.
        for name in [n for n in sys.modules if n.startswith("pyrfc.")]:
            del sys.modules[name]
    module = ModuleType("pyrfc", "pyrfc's API backed by the backchannel_rfc stub.")
    for cls in _EXPORTS:
        setattr(module, cls.__name__, cls)
    module.__version__ = PYRFC_API_LEVEL  # type: ignore[attr-defined]
    module.__all__ = [cls.__name__ for cls in _EXPORTS]  # type: ignore[attr-defined]
    sys.modules["pyrfc"] = module
    return module
