"""The OpenAI-compatible HTTP server on the engine (``moelora-dist serve``, docs/serve.md)."""
