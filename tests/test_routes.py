"""The one description of the control routes (daemon.control.routes) that the server, the
Python client and modelctl share."""

from __future__ import annotations

import pytest

from daemon.control import routes
from daemon.control.api import _HANDLERS


def test_every_route_has_a_handler_and_every_handler_a_route() -> None:
    assert set(_HANDLERS) == set(routes.BY_NAME)


def test_route_names_are_unique() -> None:
    assert len(routes.BY_NAME) == len(routes.ROUTES)


@pytest.mark.parametrize(("path", "name", "params"), [
    ("/api/v1/models/", "list_models", {}),
    ("/api/v1/models", "list_models", {}),
    ("/api/v1/models/qwen2.5-7b", "show", {"model_id": "qwen2.5-7b"}),
    ("/api/v1/models/qwen2.5-7b/", "show", {"model_id": "qwen2.5-7b"}),
    ("/api/v1/models/q/evaluate", "evaluate", {"model_id": "q"}),
    ("/api/v1/models/promote", "promote", {}),
    ("/api/v1/models/offline-mode/status", "offline_status", {}),
])
def test_paths_match_their_route(path: str, name: str, params: dict[str, str]) -> None:
    found = routes.match(path)
    assert found is not None
    methods, got = found
    assert routes.BY_NAME[name] in methods.values()
    assert got == params


@pytest.mark.parametrize("path", ["/", "/api/v1", "/api/v1/models/a/b/c", "/api/v2/status",
                                  "/api/v1/models//evaluate"])
def test_other_paths_match_nothing(path: str) -> None:
    assert routes.match(path) is None


def test_a_literal_route_wins_over_a_model_id() -> None:
    found = routes.match("/api/v1/models/promote")
    assert found is not None
    assert set(found[0]) == {"POST"}  # not GET show with model_id "promote"


def test_paths_are_built_with_quoted_params_and_a_query() -> None:
    assert routes.path("evaluate", model_id="a/b c") == "/api/v1/models/a%2Fb%20c/evaluate"
    assert routes.path("resolve", [("role", "chat"), ("capability", "code")]) == (
        "/api/v1/resolve?role=chat&capability=code")
    with pytest.raises(TypeError, match="model_id"):
        routes.path("show")
