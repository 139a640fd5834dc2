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
    Conflict,
    Forbidden,
    LimitError,
    MethodNotAllowed,
    NotFound,
    ProxyError,
    RequestTimeout,
    ShuttingDown,
    StoreError,
    Unauthorized,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnreachable,
    family_of,
    openai_error,
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


# error -> (status, OpenAI type, code)
ERRORS = [
    (ProxyError("boom"), 500, "api_error", "internal_error"),
    (BadRequest("bad"), 400, "invalid_request_error", "invalid_request"),
    (NotFound("gone"), 404, "not_found_error", "not_found"),
    (Conflict("taken"), 409, "conflict_error", "conflict"),
    (RequestTimeout("slow"), 408, "timeout_error", "request_timeout"),
    (ShuttingDown("later"), 503, "api_error", "shutting_down"),
    (UpstreamUnreachable("down"), 502, "api_error", "upstream_unreachable"),
    (UpstreamProtocolError("garbled"), 502, "api_error", "upstream_error"),
    (UpstreamTimeout("silent"), 504, "api_error", "upstream_timeout"),
    (ProxyError("too big", status=413, code="body_too_large"), 413, "invalid_request_error",
     "body_too_large"),
    (ProxyError("no", status=405, code="method_not_allowed"), 405, "api_error",
     "method_not_allowed"),
    (LimitError("slow down", status=429, code="rate_limit_exceeded", openai_type="requests"),
     429, "requests", "rate_limit_exceeded"),
    (LimitError("expired", status=403, code="user_expired"), 403, "permission_error",
     "user_expired"),
]


@pytest.mark.parametrize(("err", "status", "openai_type", "code"), ERRORS,
                         ids=[type(e[0]).__name__ + str(e[1]) for e in ERRORS])
def test_render_in_each_family(err, status, openai_type, code):
    """Native: {"error": message}. OpenAI: message, type (by status unless the error names
    its own), param null, code."""
    assert err.status == status
    assert json.loads(render(ApiFamily.NATIVE, err)) == {"error": err.message}
    assert json.loads(render(ApiFamily.OPENAI, err)) == {"error": {
        "message": err.message, "type": openai_type, "param": None, "code": code}}


def test_the_message_is_json_escaped_not_cut():
    """Quotes, newlines and non-ASCII text survive in both shapes."""
    message = 'model "é"\nnot found'
    err = NotFound(message)
    assert json.loads(render(ApiFamily.NATIVE, err))["error"] == message
    assert json.loads(render(ApiFamily.OPENAI, err))["error"]["message"] == message


@pytest.mark.parametrize(("err", "headers"), [
    (BadRequest("bad"), []),
    (ShuttingDown("later", retry_after_s=1), [(b"retry-after", b"1")]),
    (LimitError("wait", status=429, code="rate_limit_exceeded", retry_after_s=7,
                extra_headers=[(b"x-ratelimit-limit-requests", b"5")]),
     [(b"retry-after", b"7"), (b"x-ratelimit-limit-requests", b"5")]),
    # a 429 that waiting will not cure tells the official clients not to retry
    (LimitError("used up", status=429, code="insufficient_quota"),
     [(b"x-should-retry", b"false")]),
    (LimitError("expired", status=403, code="user_expired"), []),
])
def test_headers_an_error_carries(err, headers):
    """Retry-After when waiting helps; x-should-retry: false on a 429 when it does not."""
    assert err.headers() == headers


def test_a_backends_error_in_another_shape_becomes_an_openai_error():
    """FastAPI's detail (llama-cpp-python), Ollama's string error, plain text: the same
    message as ``error.message``; an OpenAI-shaped error stays as it is (None)."""
    def message(body: bytes) -> object:
        reshaped = openai_error(401, body)
        assert reshaped is not None
        doc = json.loads(reshaped)
        assert doc["error"]["type"] == "authentication_error" and doc["error"]["code"] is None
        return doc["error"]["message"]

    assert message(b'{"detail":"Invalid API key"}') == "Invalid API key"
    assert message(b'{"detail":[{"loc":["body"],"msg":"bad"}]}') == \
        '[{"loc": ["body"], "msg": "bad"}]'
    assert message(b'{"error":"unauthorized"}') == "unauthorized"
    assert message(b"Internal Server Error\n") == "Internal Server Error"
    assert message(b"") == "the backend answered 401"
    assert openai_error(401, b'{"error":{"message":"no","type":"x"}}') is None
