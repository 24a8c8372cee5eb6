"""Triton kernels and their launchers (imports as ``eurocore.kernels``).

This layer knows tensors, strides and launch grids, and nothing of autograd, dispatch or
distributed training: ``eurocore.ops`` validates inputs and calls the launchers here.
Importing a kernel module needs Triton; set ``TRITON_INTERPRET=1`` before that import to run
the kernels on the CPU through Triton's interpreter.
"""
