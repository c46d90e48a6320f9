"""Benchmarks of the daemon against supervisord and Circus (see bench/README.md)."""
