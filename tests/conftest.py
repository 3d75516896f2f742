"""Shared fixtures: the anyio backend, short work directories, and the --long flag."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.testing.harness import short_tempdir


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--long", action="store_true", default=False,
                     help="also run the long variants (kill -9 storm x500, longer fuzzing)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "long: a long variant, run only with --long")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--long"):
        return
    deselected = [item for item in items if item.get_closest_marker("long")]
    if deselected:
        # deselected, not skipped: the quick run does not pretend to have tried them
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("long")]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short directory under /tmp (Unix socket paths must stay under 108 bytes)."""
    with short_tempdir() as path:
        yield path
