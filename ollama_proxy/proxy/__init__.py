"""One proxied request end to end: identify, limit, choose a backend, relay the response
(``relay``), meter it in three phases, built → durable → after (``metering``); and the
exact recount of what a backend did not count.

The only package that joins ``api``, ``access``, ``backends`` and ``http``; it feeds
``observe`` its records. Never imports ``admin``, ``cli`` or ``sim``."""
