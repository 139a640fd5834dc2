"""A simulated Ollama (and a llama.cpp-like server) for the ``demo`` command, the tests and
the benchmarks. The gateway never imports it.

``server`` is the simulated Ollama (``Simulator``, ``run_simulator``); its endpoints are in
``generation`` and ``catalogue_endpoints``, its pure parts in ``text``, ``frames``,
``models`` and ``requests``. ``llamacpp`` stands alone.

May import: ``http`` (it runs on the same server) and the standard library. Never
anything else of the gateway."""
