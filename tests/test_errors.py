"""The one error tree: what each HTTP error carries (status, code, headers), how it
renders per API family, and the command errors that carry an exit code instead."""

from __future__ import annotations

import json

import pytest

from ollama_proxy.errors import (
    ApiFamily,
    BadRequest,
    CommandError,
    ConfigError,
    Forbidden,
    MethodNotAllowed,
    NotFound,
    ProxyError,
    StoreError,
    Unauthorized,
    family_of,
    render,
)


@pytest.mark.parametrize(("err", "status", "code", "openai_type", "headers"), [
    (BadRequest("x"), 400, "invalid_request", "invalid_request_error", []),
    (Unauthorized("x"), 401, "invalid_api_key", "authentication_error",
     [(b"www-authenticate", b"Bearer")]),
    (Forbidden("x", code="user_suspended"), 403, "user_suspended", "permission_error", []),
    (NotFound("x"), 404, "not_found", "not_found_error", []),
    (MethodNotAllowed("PUT", "/v1/me", ["GET"]), 405, "method_not_allowed", "api_error",
     [(b"allow", b"GET")]),
])
def test_http_errors_carry_status_code_and_headers(err, status, code, openai_type, headers):
    """Each error says its status, machine code and extra headers; OpenAI gets its type."""
    assert (err.status, err.code, err.headers()) == (status, code, headers)
    assert json.loads(render(ApiFamily.OPENAI, err))["error"] == {
        "message": err.message, "type": openai_type, "param": None, "code": code}
    assert json.loads(render(ApiFamily.NATIVE, err)) == {"error": err.message}


def test_method_not_allowed_lists_the_methods_sorted_in_allow_and_message():
    """Allow and the message name the same methods, sorted."""
    err = MethodNotAllowed("GET", "/api/blobs/x", {"POST", "HEAD"})
    assert err.headers() == [(b"allow", b"HEAD, POST")]
    assert err.message == "method GET is not allowed on /api/blobs/x (allowed: HEAD, POST)"


@pytest.mark.parametrize(("err", "exit_code"), [(ConfigError("x"), 2), (StoreError("x"), 1)])
def test_command_errors_carry_an_exit_code_not_a_status(err, exit_code):
    """A bad config or an unusable database ends a command; no HTTP answer renders them."""
    assert isinstance(err, CommandError) and not isinstance(err, ProxyError)
    assert (err.exit_code, err.message) == (exit_code, "x")


@pytest.mark.parametrize(("path", "family"), [
    ("/", ApiFamily.NATIVE), ("/health", ApiFamily.NATIVE), ("/api/chat", ApiFamily.NATIVE),
    ("/v1", ApiFamily.OPENAI), ("/v1/me", ApiFamily.OPENAI), ("/v1x", ApiFamily.NATIVE),
    ("/admin/api/users", ApiFamily.OPENAI), ("/admin", ApiFamily.NATIVE),
])
def test_family_of_a_path_by_its_prefix(path, family):
    """The server's own errors, before any row is matched, speak the path prefix's family."""
    assert family_of(path) is family
