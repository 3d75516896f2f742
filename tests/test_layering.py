"""The tree's rules, enforced: the core is pure, plugins use only the facade.

``daemon/core/`` holds the decisions (health, scoring, policy, registry). It may import the
standard library's pure modules and its own siblings, nothing else: no file system, no clock,
no sockets, no event loop, no module of the shell. The simulator drives the same core on a
virtual clock, so a clock read hidden in it would make the simulation lie.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "daemon" / "core"

#: Standard-library modules the core may use: data structures and arithmetic, no I/O.
PURE_STDLIB = frozenset({
    "__future__", "bisect", "collections", "dataclasses", "enum", "functools", "heapq",
    "itertools", "math", "operator", "re", "types", "typing",
})


def impurities(source: str, filename: str = "<source>") -> list[str]:
    """What in ``source`` (a core module) breaks the core's rules, one line each."""
    tree = ast.parse(source, filename)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top not in PURE_STDLIB:
                    found.append(f"{filename}:{node.lineno}: imports {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                top = (node.module or "").split(".")[0]
                if top not in PURE_STDLIB:
                    found.append(f"{filename}:{node.lineno}: imports from {node.module}")
            elif node.level > 1:
                found.append(f"{filename}:{node.lineno}: imports from outside daemon/core "
                             f"({'.' * node.level}{node.module or ''})")
        elif isinstance(node, ast.AsyncFunctionDef | ast.Await | ast.AsyncFor | ast.AsyncWith):
            found.append(f"{filename}:{node.lineno}: {type(node).__name__} (the core never awaits)")
    return found


def core_modules() -> list[Path]:
    return sorted(CORE.glob("*.py"))


def test_the_core_has_modules_to_check() -> None:
    names = {p.stem for p in core_modules()}
    assert {"model", "settings", "health", "scoring", "policy", "registry"} <= names


@pytest.mark.parametrize("path", core_modules(), ids=lambda p: p.name)
def test_core_module_is_pure(path: Path) -> None:
    assert impurities(path.read_text(), str(path.relative_to(ROOT))) == []


@pytest.mark.parametrize("source", [
    "import os",
    "import time",
    "from time import monotonic",
    "import anyio",
    "import httpx",
    "import socket",
    "from os import path",
    "from ..config import load_config",
    "from ..service.lifecycle import Daemon",
    "from daemon.persist import store",
    "async def f():\n    pass",
])
def test_the_purity_check_catches(source: str) -> None:
    assert impurities(source) != []


@pytest.mark.parametrize("source", [
    "from .model import ModelSpec",
    "from . import policy",
    "import math",
    "from collections import deque",
])
def test_the_purity_check_allows(source: str) -> None:
    assert impurities(source) == []


def daemon_imports(source: str) -> list[str]:
    """The daemon modules ``source`` imports (``daemon`` for the facade itself)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "daemon"]
        elif (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
              and node.module.split(".")[0] == "daemon"):
            found.append(node.module)
    return found


PLUGIN_FILES = sorted([*ROOT.glob("plugins/*.py"), *ROOT.glob("examples/plugins/*.py")])


@pytest.mark.parametrize("path", PLUGIN_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_plugins_import_only_the_facade(path: Path) -> None:
    assert set(daemon_imports(path.read_text())) <= {"daemon"}


def test_the_facade_check_catches_a_reach_past_it() -> None:
    assert daemon_imports("from daemon.probing.replies import Reply") == [
        "daemon.probing.replies"]


def test_every_facade_name_resolves() -> None:
    import daemon

    for name in daemon.__all__:
        assert getattr(daemon, name) is not None, name
