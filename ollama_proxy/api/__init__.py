"""What the Ollama and OpenAI surfaces mean, sans-IO: the proxied paths, headers that cross,
request bodies and their rules, stream framing, usage in responses, tokenizer endpoints.

May import: ``errors``, ``isotime``, the standard library. Never trio, never another
sub-package: access, backends and the proxy build on it."""
