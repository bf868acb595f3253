"""A small demo system: client 100, a few users, T000, USR02-like users, SCARR and SFLIGHT."""

from __future__ import annotations

import datetime
from collections.abc import Callable

from ._modules import install_standard_modules
from ._system import AbapSystem, User


def demo_system(
    *, now: Callable[[], datetime.datetime] = lambda: datetime.datetime(2026, 1, 2, 3, 4, 5)
) -> AbapSystem:
    """A fresh demo system (a factory, so no state is shared between callers)."""
    system = AbapSystem("BCH", "758", now=now)
    system.add_user("100", User("DEMO", "welcome", "Demo", "User"))
    system.add_user("100", User("ALICE", "secret1", "Alice", "Example"))
    system.add_user("200", User("DEMO", "other", "Demo", "Two"))
    system.map_certificate("100", "CN=alice,O=Example", "ALICE")
    system.add_table(
        "T000",
        [("MANDT", "C", 3, "Client"), ("MTEXT", "C", 25, "Client name")],
        [{"MANDT": "100", "MTEXT": "Demo client"}, {"MANDT": "200", "MTEXT": "Test client"}],
    )
    system.add_table(
        "USR02",
        [
            ("MANDT", "C", 3, "Client"),
            ("BNAME", "C", 12, "User name"),
            ("USTYP", "C", 1, "User type"),
        ],
        [
            {"MANDT": "100", "BNAME": "DEMO", "USTYP": "A"},
            {"MANDT": "100", "BNAME": "ALICE", "USTYP": "A"},
        ],
    )
    system.add_table(
        "SCARR",
        [
            ("CARRID", "C", 3, "Airline Code"),
            ("CARRNAME", "C", 20, "Airline name"),
            ("CURRCODE", "C", 5, "Local currency of airline"),
        ],
        [
            {"CARRID": "AA", "CARRNAME": "American Airlines", "CURRCODE": "USD"},
            {"CARRID": "LH", "CARRNAME": "Lufthansa", "CURRCODE": "EUR"},
            {"CARRID": "UA", "CARRNAME": "United Airlines", "CURRCODE": "USD"},
        ],
    )
    system.add_table(
        "SFLIGHT",
        [
            ("CARRID", "C", 3, "Airline Code"),
            ("CONNID", "N", 4, "Flight Connection Number"),
            ("FLDATE", "D", 8, "Flight date"),
            ("PRICE", "P", 16, "Airfare"),
        ],
        [
            {"CARRID": "LH", "CONNID": "0400", "FLDATE": "20260115", "PRICE": "666.00"},
            {"CARRID": "LH", "CONNID": "0402", "FLDATE": "20260116", "PRICE": "669.00"},
            {"CARRID": "AA", "CONNID": "0017", "FLDATE": "20260117", "PRICE": "422.94"},
        ],
    )
    system.add_table("WIDE", [(f"F{i}", "C", 100, "wide") for i in range(6)], [])
    install_standard_modules(system)
    return system
