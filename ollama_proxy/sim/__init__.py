"""A simulated Ollama (and a llama.cpp-like server) for the ``demo`` command, the tests and
the benchmarks. The gateway never imports it.

May import: ``http`` (it runs on the same server) and the standard library."""
