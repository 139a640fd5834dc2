"""HTTP/1.1 on trio and h11, both sides: the server (listeners and caps, one connection's
request loop and state, the responder, the client-gone watch), the upstream client and its
pool, message values and body framing, and who the peer is (address rules). Knows nothing
of users, models or usage.

May import: ``errors``, the standard library, trio, h11. Never ``api``, ``access``,
``backends``, ``proxy``, ``store``, ``admin``, ``observe`` or ``sim``: handlers are injected
by ``app``."""
