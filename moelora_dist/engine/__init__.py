"""The serving engine: scheduler, paged KV cache, sampling, text, the Python API."""
