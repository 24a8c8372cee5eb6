"""What the kernels take, in one place that needs no Triton: the ops check their inputs
against these before any launch (``eurocore.ops``), and the compile check sweeps every
configuration up to them (``eurocore.kernels.aot``). The C++ kernels of the same ops keep
the same limits.
"""

# Rotary keeps half a head's rotary dims per token in registers; far beyond any model.
ROTARY_MAX_HEAD_DIM = 1024
# Attention holds a (block, head_dim) tile of q, k and v per program; head_dim a multiple of 8
# up to this (the largest of the launch-configuration tables).
ATTENTION_MAX_HEAD_DIM = 256
