"""daemon.testing for plugin authors: the README's example plugin tests run, and the helpers
behave as documented."""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType

import anyio
import httpx
import pytest

from daemon import ModelSpec, ProbeContext, ProbeResult, ProbeStatus, UpstreamError
from daemon.testing import probe_context, run_probe

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_TESTS = ROOT / "examples" / "plugin_tests" / "test_http_health.py"


def load_example_tests() -> ModuleType:
    sys.path.insert(0, str(ROOT / "examples" / "plugins"))
    try:
        spec = importlib.util.spec_from_file_location("example_plugin_tests", EXAMPLE_TESTS)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "examples" / "plugins"))


EXAMPLES = load_example_tests()
EXAMPLE_NAMES = sorted(n for n, f in vars(EXAMPLES).items()
                       if n.startswith("test_") and inspect.iscoroutinefunction(f))


def test_the_example_has_tests() -> None:
    assert len(EXAMPLE_NAMES) >= 3


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_the_readme_example_plugin_tests_pass(name: str) -> None:
    anyio.run(getattr(EXAMPLES, name))


SPEC = ModelSpec(id="m", provider="p", endpoint="http://127.0.0.1:1", api_key_env="KIT_KEY")


class RaisingProbe:
    async def probe(self, spec: ModelSpec, ctx: ProbeContext) -> ProbeResult:
        raise RuntimeError("plugin bug")


class HangingProbe:
    async def probe(self, spec: ModelSpec, ctx: ProbeContext) -> ProbeResult:
        await anyio.sleep(60)
        return ProbeResult.healthy()


def never_called(request: httpx.Request) -> httpx.Response:
    raise AssertionError("no request expected")


@pytest.mark.anyio
async def test_run_probe_isolates_a_raising_probe_as_the_daemon_does() -> None:
    result = await run_probe(RaisingProbe(), SPEC, never_called)
    assert result.status is ProbeStatus.FAILED
    assert result.reason == "probe raised RuntimeError: plugin bug"


@pytest.mark.anyio
async def test_run_probe_bounds_a_hanging_probe_by_its_timeout() -> None:
    result = await run_probe(HangingProbe(), SPEC, never_called, timeout=0.2)
    assert (result.status, result.reason) == (ProbeStatus.FAILED, "timed out after 0.2s")


@pytest.mark.anyio
async def test_probe_context_answers_from_the_handler_and_builds_auth_headers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, json={"ok": True})

    monkeypatch.setenv("KIT_KEY", "sk-test-1234\n")
    async with probe_context(handler) as ctx:
        reply = await ctx.get_json("http://127.0.0.1:1/x", headers=ctx.auth_headers(SPEC))
    assert (reply.status, reply.json()) == (200, {"ok": True})
    assert seen == ["Bearer sk-test-1234"]
    monkeypatch.delenv("KIT_KEY")
    async with probe_context(handler) as ctx:
        with pytest.raises(UpstreamError, match="KIT_KEY is not set"):
            ctx.auth_headers(SPEC)
