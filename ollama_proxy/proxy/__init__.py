"""One proxied request end to end: identify, limit, choose a backend, relay the response
(``relay``), meter it in three phases, built → durable → after (``metering``); and the
exact recount of what a backend did not count.

May import: ``api``, ``access``, ``backends``, ``http`` and ``observe`` (which it feeds
its records): the only package that joins them. Never ``admin``, ``cli`` or ``sim``."""
