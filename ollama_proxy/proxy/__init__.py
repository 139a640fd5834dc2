"""One proxied request end to end: identify, limit, choose a backend, relay the response,
meter its usage; and the exact recount of what a backend did not count.

The only package that joins ``api``, ``access``, ``backends`` and ``http``. Never imports
``admin``, ``cli`` or ``sim``."""
