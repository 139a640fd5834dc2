"""What the gateway tells about its traffic, fed records by the proxy: the access log today
(one JSON line per request), metrics later. Never in a response's way.

May import: ``api`` values (the records it is fed), the standard library, trio. Never
``proxy``, ``access``, ``backends``, ``http``, ``store``, ``admin``, ``cli`` or ``sim``: it
reads what it is given, not their internals."""
