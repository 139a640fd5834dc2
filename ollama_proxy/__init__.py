"""ollama-proxy: an authenticating, metering gateway for Ollama and OpenAI-compatible servers."""

__version__ = "0.1.0"
