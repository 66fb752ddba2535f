"""Test fixtures and sweep machinery: the built-in tiny model and adapters, the simulated-rank
sweep, the kernel test cases. Runtime code never imports this package; the tests, the
benchmarks and the ``sweep`` command do."""
