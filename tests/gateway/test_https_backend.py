"""The gateway in front of an https backend: the simulator behind a TLS terminator with a
certificate made here (trustme), so the real gateway speaks TLS to it."""

from __future__ import annotations

import functools
import json
import logging
import ssl
from pathlib import Path

import h11
import httpx
import pytest
import trio
import trustme

from gateway_stack import gateway_config, start_gateway
from ollama_proxy.app import Gateway
from ollama_proxy.sim.server import Simulator, run_simulator

TIMEOUT_S = 10
CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}


class Terminator:
    """TLS in front of a plain port: forwards bytes both ways; counts the connections it
    accepted and keeps what the backend sent on each."""

    def __init__(self, backend_port: int) -> None:
        self.backend_port = backend_port
        self.accepted = 0
        self.from_backend: list[bytearray] = []

    async def handle(self, client: trio.SSLStream[trio.SocketStream]) -> None:
        self.accepted += 1
        try:
            await client.do_handshake()
        except trio.BrokenResourceError:
            return  # the gateway refused our certificate
        sent = bytearray()
        self.from_backend.append(sent)
        async with await trio.open_tcp_stream("127.0.0.1", self.backend_port) as backend:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pipe, client, backend, None, nursery.cancel_scope)
                nursery.start_soon(self._pipe, backend, client, sent, nursery.cancel_scope)

    @staticmethod
    async def _pipe(source: trio.abc.Stream, sink: trio.abc.Stream, record: bytearray | None,
                    done: trio.CancelScope) -> None:
        """Copy until either side ends, then end both."""
        try:
            while data := await source.receive_some(65536):
                if record is not None:
                    record += data
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        done.cancel()

    def bodies(self) -> list[bytes]:
        """Every complete response body the backend sent, de-chunked."""
        out = []
        for raw in self.from_backend:
            conn = h11.Connection(h11.CLIENT)
            conn.receive_data(bytes(raw))
            while (body := _next_body(conn)) is not None:
                out.append(body)
                conn.start_next_cycle()
        return out


def _next_body(conn: h11.Connection) -> bytes | None:
    """The body of the next response in ``conn``'s data; None when none is complete."""
    conn.send(h11.Request(method="POST", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    body = b""
    while (event := conn.next_event()) is not h11.NEED_DATA:
        if isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return body
    return None


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = str(tmp_path / "ca.pem")
    ca.cert_pem.write_to_path(path)
    return path


async def start_terminator(nursery: trio.Nursery, ca: trustme.CA,
                           names: tuple[str, ...] = ("127.0.0.1",)) -> tuple[Terminator, str]:
    """The simulator behind TLS with a certificate of ``ca`` for ``names``; its https URL."""
    _, sim_port = await nursery.start(run_simulator, Simulator(), "127.0.0.1", 0)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    terminator = Terminator(sim_port)
    listeners = await nursery.start(functools.partial(
        trio.serve_ssl_over_tcp, terminator.handle, 0, context, host="127.0.0.1"))
    return terminator, f"https://127.0.0.1:{listeners[0].transport_listener.socket.getsockname()[1]}"


async def gateway_to(nursery: trio.Nursery, url: str, **keys: str) -> tuple[str, dict[str, str], Gateway]:
    """A gateway whose one backend is ``url``, with ``keys`` of its section; its URL,
    the admin's headers and the gateway."""
    env = {f"OLLAMA_PROXY_UPSTREAM_DEFAULT_{key.upper()}": value for key, value in keys.items()}
    gateway, gateway_url, _, key = await start_gateway(nursery, gateway_config([url], env=env))
    return gateway_url, {"Authorization": f"Bearer {key}"}, gateway


async def chat(url: str, headers: dict[str, str], stream: bool) -> httpx.Response:
    async with httpx.AsyncClient(timeout=5) as client:
        return await client.post(url + "/api/chat", headers=headers, json={**CHAT, "stream": stream})


async def test_chats_pass_byte_for_byte_on_one_pooled_tls_connection(nursery, ca, ca_file) -> None:
    """With the private CA in ca_file, a non-streamed and a streamed chat arrive as the
    backend sent them; the second request and a health check reuse the pooled connection."""
    with trio.fail_after(TIMEOUT_S):
        terminator, backend_url = await start_terminator(nursery, ca)
        url, headers, gateway = await gateway_to(nursery, backend_url, ca_file=ca_file)
        whole = await chat(url, headers, stream=False)
        connections = terminator.accepted
        streamed = await chat(url, headers, stream=True)
        backend = gateway.backends.backends[0]
        await backend.probe()  # a health check: through the same pool
    assert (whole.status_code, streamed.status_code) == (200, 200)
    assert json.loads(whole.content)["done"] is True
    assert len(streamed.content.splitlines()) > 2
    chats = [body for body in terminator.bodies() if not body.startswith((b'{"version":', b'{"models":'))]
    assert sorted(chats) == sorted([whole.content, streamed.content])  # health checks aside
    assert terminator.accepted == connections
    assert backend.health.up is True


async def test_an_untrusted_certificate_is_a_502_naming_tls(nursery, ca, ca_file) -> None:
    """A certificate of a CA the system store lacks: 502 saying TLS and why; with that CA
    in ca_file the same backend answers."""
    with trio.fail_after(TIMEOUT_S):
        _, backend_url = await start_terminator(nursery, ca)
        url, headers, _ = await gateway_to(nursery, backend_url)
        refused = await chat(url, headers, stream=False)
        url, headers, _ = await gateway_to(nursery, backend_url, ca_file=ca_file)
        trusted = await chat(url, headers, stream=False)
    assert refused.status_code == 502
    assert "TLS handshake" in refused.json()["error"]
    assert "certificate verify failed" in refused.json()["error"]
    assert trusted.status_code == 200


async def test_a_certificate_for_another_name_is_a_502(nursery, ca, ca_file) -> None:
    """A trusted certificate that does not name the url's host is refused."""
    with trio.fail_after(TIMEOUT_S):
        _, backend_url = await start_terminator(nursery, ca, names=("other.example",))
        url, headers, _ = await gateway_to(nursery, backend_url, ca_file=ca_file)
        response = await chat(url, headers, stream=False)
    assert response.status_code == 502
    assert "TLS handshake" in response.json()["error"] and "mismatch" in response.json()["error"]


async def test_tls_verify_false_answers_and_warns(nursery, ca, caplog) -> None:
    """tls_verify = false accepts the untrusted certificate and logs one warning naming the backend."""
    with trio.fail_after(TIMEOUT_S):
        _, backend_url = await start_terminator(nursery, ca, names=("other.example",))
        with caplog.at_level(logging.WARNING, logger="ollama_proxy.app"):
            url, headers, _ = await gateway_to(nursery, backend_url, tls_verify="false")
        response = await chat(url, headers, stream=False)
    assert response.status_code == 200
    warnings = [r.getMessage() for r in caplog.records if r.name == "ollama_proxy.app"]
    assert warnings == ["backend default: tls_verify = false: its certificate and name are not "
                        "checked (for testing only)"]
