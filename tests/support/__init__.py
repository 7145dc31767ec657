"""Test-only helpers shared by the tests and the benchmarks (servers in subprocesses, raw HTTP, metrics)."""
