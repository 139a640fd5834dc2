"""Where a request goes: the configured backends, their health, the candidates in order.

May import: ``errors``, ``api``, ``http.client``. Never ``access``, ``proxy``, ``store``,
``admin``, ``cli``, ``observe`` or ``sim``: a fair queue gets a user name, not an account."""
