"""``GET /metrics``: the Prometheus page, for the ``[metrics] allow`` addresses without
a key, and for an admin key from anywhere; anyone else gets 403."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ..access.identity import KeyIndex, authorize
from ..errors import Forbidden, ProxyError
from ..http.clientip import IpNetwork, parse_address
from ..http.messages import Request
from ..http.responder import Responder

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class MetricsPage:
    """The dispatch-table handler; ``render`` makes the page (``GatewayMetrics.render``)."""

    def __init__(self, render: Callable[[], bytes], allow: tuple[IpNetwork, ...],
                 index: KeyIndex) -> None:
        self._render = render
        self._allow = allow
        self._index = index

    def allowed(self, client: str) -> bool:
        address = parse_address(client)
        return address is not None and any(address in network for network in self._allow)

    async def handle(self, request: Request, responder: Responder,
                     params: Mapping[str, str]) -> None:
        # A request a proxy forwarded (X-Forwarded-For) is not the allowed address's own,
        # whatever its address: a reverse proxy on the box would make every caller local.
        forwarded = request.header(b"x-forwarded-for") is not None
        if forwarded or not self.allowed(request.client):
            try:
                authorize(self._index.identify(request), admin=True)
            except ProxyError:  # no key, a wrong one or not an admin's: all the same here
                raise Forbidden("/metrics is served to the [metrics] allow addresses and to "
                                "admin keys") from None
        await responder.respond(200, [(b"content-type", CONTENT_TYPE)], self._render())
