"""SQLite, synchronous: the file and its migrations, users and keys, the ledger, usage
reports, what a batch of ledger rows does (``group_commit``); and, last, the one
module that runs them off the event loop (``threads``).

May import: ``errors``, ``isotime``, ``api`` values, ``access`` values (keys, limits). Only
``store.threads`` imports trio. Never ``http``, ``backends``, ``proxy``, ``admin``, ``cli``,
``observe`` or ``sim``."""
