"""HTTP/1.1 on trio and h11, both sides: the server, the upstream client and its pool,
body framing, and who the peer is (address rules). Knows nothing of users, models or usage.

May import: ``errors``, the standard library, trio, h11. Never ``api``, ``access``,
``backends``, ``proxy``, ``store``, ``admin``, ``observe`` or ``sim``: handlers are injected
by ``app``."""
