"""eurocore: fused kernels and a Megatron-style Llama trainer for AMD and NVIDIA HPC machines.

Layers, each importing only those below it (see docs/design.md): ``eurocore.kernels`` (Triton),
``eurocore._C`` (optional CUDA/HIP build), ``eurocore.ops`` (one entry point per op),
``eurocore.nn`` (drop-in modules), then parallelism, the model and the trainer.
"""

__version__ = "0.1.0"
