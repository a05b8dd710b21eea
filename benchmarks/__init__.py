"""Benchmarks (not tests): python -m benchmarks.throughput, python -m benchmarks.input_pipeline,
python -m benchmarks.step_profile, python -m benchmarks.attention_core,
python -m benchmarks.kernel_resources (the pallas kernels' registers and spills, no GPU needed)."""
