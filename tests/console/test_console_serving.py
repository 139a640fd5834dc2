"""The web console's files over HTTP: served without a key, with the security
headers, the right types and an ETag; ``/`` sends browsers on to ``/admin``; the
whole console stays small."""

from __future__ import annotations

import re

import httpx
import pytest
import trio

from gateway_stack import Stack
from ollama_proxy.admin import console_page

TIMEOUT_S = 10
BUDGET_BYTES = 60 * 1024

TYPES = {"/admin": "text/html; charset=utf-8", "/admin/console.css": "text/css; charset=utf-8",
         "/admin/console.js": "text/javascript; charset=utf-8"}


def assert_secured(response: httpx.Response) -> None:
    headers = response.headers
    csp = headers["content-security-policy"]
    assert "default-src 'self'" in csp and "unsafe-inline" not in csp
    assert headers["x-frame-options"] == "DENY"
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["x-content-type-options"] == "nosniff"
    assert re.fullmatch(r'"[0-9a-f]{20}"', headers["etag"])


@pytest.mark.parametrize("path", sorted(TYPES))
async def test_each_file_is_served_without_a_key_and_cached_by_etag(stack: Stack, path: str) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(base_url=stack.url, timeout=5) as client:
            first = await client.get(path)
            again = await client.get(path, headers={"If-None-Match": first.headers["etag"]})
            listed = await client.get(path, headers={"If-None-Match": f'"x", W/{first.headers["etag"]}'})
            other = await client.get(path, headers={"If-None-Match": '"0000"'})
            head = await client.head(path)
    assert first.status_code == 200
    assert first.headers["content-type"] == TYPES[path]
    assert_secured(first)
    assert first.content == console_page.asset(path).body
    assert (again.status_code, again.content) == (304, b"")
    assert again.headers["etag"] == first.headers["etag"]
    assert again.headers["content-length"] == str(len(first.content))  # the file's, no body
    assert_secured(again)
    assert listed.status_code == 304
    assert (other.status_code, other.content) == (200, first.content)
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) == len(first.content)


async def test_root_redirects_browsers_and_answers_clients(stack: Stack) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(base_url=stack.url, timeout=5) as client:
            browser = await client.get("/", headers={
                "Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"})
            plain = await client.get("/")
            curl = await client.get("/", headers={"Accept": "*/*"})
    assert browser.status_code == 302 and browser.headers["location"] == "/admin"
    assert (plain.status_code, plain.text) == (200, "Ollama is running")
    assert (curl.status_code, curl.text) == (200, "Ollama is running")


def test_the_page_loads_nothing_inline_or_from_elsewhere() -> None:
    html = console_page.asset("/admin").body.decode()
    assert "<style" not in html and " style=" not in html
    scripts = re.findall(r"<script[^>]*>", html)
    assert scripts == ['<script src="/admin/console.js" defer></script>'[:-9]]
    assert not re.search(r" on[a-z]+=", html)
    for body in (console_page.asset(p).body.decode() for p in console_page.FILES):
        assert "http://" not in body.replace("http://www.w3.org/2000/svg", "")
        assert "https://" not in body and "//cdn" not in body


def test_data_goes_in_as_text_never_as_markup() -> None:
    script = console_page.asset("/admin/console.js").body.decode()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "new Function"):
        assert sink not in script, sink


def test_the_console_is_under_its_size_budget() -> None:
    total = sum(len(console_page.asset(path).body) for path in console_page.FILES)
    assert total < BUDGET_BYTES, total
