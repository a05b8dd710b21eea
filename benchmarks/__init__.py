"""Benchmarks (not tests): python -m benchmarks.throughput, python -m benchmarks.input_pipeline,
python -m benchmarks.step_profile, python -m benchmarks.attention_core."""
