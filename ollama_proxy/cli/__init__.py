"""Commands beside ``serve``: offline administration on the database file, the ``demo``,
and the systemd unit. Parse argv, call the same use-cases as the admin API, print.

May import: anything below it (``app``, ``config``, ``store``, ``access`` values). The
``demo`` is the only gateway module that imports ``sim``. Never imported by anything but
``__main__``."""
