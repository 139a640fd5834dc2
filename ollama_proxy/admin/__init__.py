"""The admin API (``/admin/api/*``) and the caller's own ``/v1/me`` and ``/v1/usage``:
parse, call the store's use-cases, render.

May import: everything below it (``api``, ``access``, ``backends``, ``store``, ``http``).
Never ``proxy``, ``cli`` or ``sim``."""
