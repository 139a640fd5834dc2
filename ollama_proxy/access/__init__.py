"""Who may call and how much: API keys, the in-memory key index, limits and quotas
(arithmetic, counters, the per-request step).

May import: ``errors``, ``isotime``, ``api``, ``store`` (to read keys and rebuild counters),
``http.messages`` types. Never ``backends``, ``proxy``,
``admin``, ``cli``, ``observe`` or ``sim``."""
