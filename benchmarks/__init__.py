"""Benchmarks of lightning-holograd: run each from the repository root as a module,
``python -m benchmarks.<name>`` (see benchmarks/README.md)."""
