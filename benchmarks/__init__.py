"""Kernel benchmarks (imports as ``eurocore.benchmarks``; run ``python -m eurocore.benchmarks``).

``harness`` times cases and reports time, GB/s and TFLOP/s against the copy bandwidth and
matmul rate measured on the same device in the same run; one module per op (``rms_norm``)
lists that op's cases. Measured results go to ``benchmarks/results/`` (not installed).
"""
