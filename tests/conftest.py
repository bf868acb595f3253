"""Suite-wide options: ``--fuzz[=EXAMPLES]`` turns the fuzz targets' short budget into a long one.

Every fuzz target (marked ``fuzz``) runs in the default suite with a budget of a few dozen to a
few hundred examples, a few seconds in all. ``pytest -m fuzz --fuzz`` runs only them, each with
:data:`LONG_BUDGET` examples (or the number given: ``--fuzz=200000``); see docs/reliability.md.
"""

from __future__ import annotations

import pytest

#: Examples per fuzz target with a bare ``--fuzz``.
LONG_BUDGET = 20_000


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fuzz",
        action="store",
        type=int,
        nargs="?",
        const=LONG_BUDGET,
        default=0,
        metavar="EXAMPLES",
        help=f"run the fuzz targets with EXAMPLES examples each (default {LONG_BUDGET})",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "fuzz: a hypothesis fuzz target (short budget unless --fuzz is given)"
    )


@pytest.fixture
def fuzz_examples(request: pytest.FixtureRequest) -> int:
    """Examples for this run: 0 means "the target's own short default"."""
    value = request.config.getoption("--fuzz")
    assert isinstance(value, int)
    return value
