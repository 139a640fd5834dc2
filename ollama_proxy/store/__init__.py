"""SQLite, synchronous: the file and its migrations, users and keys, the ledger, usage
reports; and, last, the one module that runs them off the event loop (``threads``).

May import: ``errors``, ``isotime``, ``api`` values, ``access`` values (keys, limits). Only
``store.threads`` imports trio."""
