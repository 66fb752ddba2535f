"""The project's benchmarks: ``python -m benchmarks SUITE [options]`` (see README.md here)."""
