"""The gateway's own answers: the admin API (``/admin/api/*``), the caller's own
``/v1/me`` and ``/v1/usage`` (parse, call the store's use-cases, render), and the keyless
``/`` and ``/health``. The dispatch table says which path reaches which.

May import: everything below it (``api``, ``access``, ``backends``, ``store``, ``http``).
Never ``proxy``, ``cli`` or ``sim``."""
