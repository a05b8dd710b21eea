"""Benchmarks (not tests): python -m benchmarks.throughput, python -m benchmarks.input_pipeline."""
