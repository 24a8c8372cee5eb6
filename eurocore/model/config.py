"""Model configurations: one frozen dataclass, and named presets.

    config = preset("eurollm-9b")                    # docs/design.md, Reference model shapes
    config = preset("tiny", num_layers=4)            # any field overridden by name
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from eurocore.ops.rotary import rope_cos_sin
from eurocore.utils.checks import check_bool, check_int, check_number


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-style decoder: pre-RMSNorm, RoPE (rotate-half), GQA attention, SwiGLU MLP.

    Sizes are the full model's; the tensor-parallel degree divides heads, kv heads and the
    MLP width (see :meth:`check_layout`). ``seed`` fixes every initial weight, whatever the
    layout.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    ffn_hidden_size: int
    max_seq_len: int
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    seed: int = 1234

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "ffn_hidden_size", "max_seq_len"):
            check_int(name, getattr(self, name), minimum=1)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size: {self.hidden_size} is not divisible by num_heads "
                             f"= {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads: {self.num_kv_heads} does not divide num_heads = "
                             f"{self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"hidden_size: head_dim = {self.head_dim} must be even for RoPE")
        check_number("rope_theta", self.rope_theta, minimum=1.0, inclusive=False)
        check_number("norm_eps", self.norm_eps, minimum=0.0)
        check_number("init_std", self.init_std, minimum=0.0, inclusive=False)
        check_bool("tie_embeddings", self.tie_embeddings)
        # seed · 2**32 + the per-weight offsets must stay a valid generator seed (< 2**63)
        check_int("seed", self.seed, minimum=0, maximum=2**31 - 1)
        try:  # the rope op owns the rules of the scaling dict: no table is made for 0 rows
            rope_cos_sin(0, self.head_dim, theta=self.rope_theta, scaling=self.rope_scaling)
        except (TypeError, ValueError) as err:
            message = str(err).removeprefix("scaling: ").removeprefix("theta: ")
            raise type(err)(f"rope_scaling: {message}") from None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def check_layout(self, tp: int, sequence_parallel: bool = False,
                     seq_len: int | None = None) -> None:
        """Raises ValueError, saying what to change, when ``tp`` cannot split this model.

        tp must divide the query heads, the kv heads (each rank keeps whole GQA groups) and
        the MLP width; with sequence parallelism it must also divide the sequence length.
        """
        for what, value in (("num_heads", self.num_heads), ("num_kv_heads", self.num_kv_heads),
                            ("ffn_hidden_size", self.ffn_hidden_size)):
            if value % tp:
                valid = [t for t in range(1, self.num_kv_heads + 1)
                         if self.num_heads % t == 0 and self.num_kv_heads % t == 0
                         and self.ffn_hidden_size % t == 0]
                raise ValueError(f"tp: {tp} does not divide {what} = {value}; this model "
                                 f"splits over tp in {valid}")
        if sequence_parallel and seq_len is not None and seq_len % tp:
            raise ValueError(f"seq_len: {seq_len} is not divisible by tp = {tp}, as sequence "
                             f"parallelism needs; use a multiple of {tp} or turn it off")

    def training_flops_per_token(self, seq_len: int) -> int:
        """Model FLOPs of one training step per token (forward and backward) for sequences
        of ``seq_len`` tokens: every matmul counted exactly, times 3 (the backward does
        twice the forward's), as MFU counts them.

        Forward, per token: per layer 2·h·(h + 2·kv) for q, k and v, 2·h² for the output
        projection, 6·h·f for gate, up and down, and 2·s·h for causal attention's two s x d
        products over on average s / 2 keys (the masked half is not counted, as the attention
        benchmark counts it); then 2·h·V for the head (vocabulary unpadded). Norms, RoPE,
        softmax and the loss are not matmuls and not counted; nor is recomputation (flash
        attention's backward, activation checkpointing), which costs hardware FLOPs, not
        model FLOPs. This is 6 x the matmul parameters + 6·L·s·h (PaLM's formula with the
        causal half of attention).
        """
        h, kv, f = self.hidden_size, self.num_kv_heads * self.head_dim, self.ffn_hidden_size
        per_layer = 2 * h * (h + 2 * kv) + 2 * h * h + 6 * h * f + 2 * seq_len * h
        return 3 * (self.num_layers * per_layer + 2 * h * self.vocab_size)

    def num_parameters(self) -> int:
        """Parameters of the full model (vocabulary unpadded)."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        per_layer = (h * (h + 2 * kv) + h * h        # q, k, v and the output projection
                     + 3 * h * self.ffn_hidden_size  # gate, up, down
                     + 2 * h)                        # two norms
        embeddings = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + embeddings + h


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

PRESETS: dict[str, ModelConfig] = {
    # Trains in about a minute on a laptop CPU. 250 tokens: not divisible by 4 or 8, so
    # every TP run exercises vocabulary padding; 8 heads and 4 kv heads allow tp = 4.
    "tiny": ModelConfig(vocab_size=250, hidden_size=64, num_layers=2, num_heads=8,
                        num_kv_heads=4, ffn_hidden_size=176, max_seq_len=256),
    # Llama-3.2-1B's shapes: tied embeddings, llama3 RoPE scaling.
    "llama-1b": ModelConfig(vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32,
                            num_kv_heads=8, ffn_hidden_size=8192, max_seq_len=8192,
                            rope_theta=500000.0, rope_scaling=LLAMA3_SCALING,
                            tie_embeddings=True),
    "llama3-8b": ModelConfig(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32,
                             num_kv_heads=8, ffn_hidden_size=14336, max_seq_len=8192,
                             rope_theta=500000.0),
    "eurollm-9b": ModelConfig(vocab_size=128000, hidden_size=4096, num_layers=42, num_heads=32,
                              num_kv_heads=8, ffn_hidden_size=12288, max_seq_len=4096,
                              rope_theta=10000.0),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset with ``overrides`` applied (any ModelConfig field)."""
    if name not in PRESETS:
        raise ValueError(f"preset: expected one of {', '.join(PRESETS)}, got {name!r}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"{unknown[0]}: not a ModelConfig field; fields: "
                         f"{', '.join(sorted(fields))}")
    return dataclasses.replace(PRESETS[name], **overrides)
