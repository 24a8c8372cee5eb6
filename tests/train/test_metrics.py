"""MFU (eurocore.train.metrics, ModelConfig.training_flops_per_token): the FLOPs per token
against a hand count and against PaLM's formula, the peak table by device name, and the
trainer's logged TFLOP/s and MFU."""

from __future__ import annotations

import pytest
import torch

from eurocore.model import preset
from eurocore.train.distributed import Process
from eurocore.train.metrics import device_peak, peak_tflops
from eurocore.train.trainer import TrainConfig, Trainer

CPU = Process(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_flops_per_token_of_the_tiny_model_by_hand():
    # h 64 (8 heads of 8), k and v 32 wide (4 kv heads of 8), f 176, 2 layers, vocab 250,
    # s 128; forward per layer: q 2·64·64 + k, v 2·2·64·32 + out 2·64·64 + gate, up, down
    # 6·64·176 + attention 2·128·64; then the head 2·64·250
    per_layer = 8192 + 8192 + 8192 + 67584 + 16384
    forward = 2 * per_layer + 2 * 64 * 250
    assert preset("tiny").training_flops_per_token(128) == 3 * forward == 747_264


@pytest.mark.parametrize("name, seq_len", [("llama3-8b", 8192), ("llama-1b", 2048),
                                           ("eurollm-9b", 4096)])
def test_flops_per_token_is_palms_formula_with_causal_attention(name, seq_len):
    """6 x the parameters that multiply (no embedding lookup, no norm) + 6·L·s·h."""
    config = preset(name)
    norms = (2 * config.num_layers + 1) * config.hidden_size
    lookup = 0 if config.tie_embeddings else config.vocab_size * config.hidden_size
    matmul = config.num_parameters() - norms - lookup
    expected = 6 * matmul + 6 * config.num_layers * seq_len * config.hidden_size
    assert config.training_flops_per_token(seq_len) == expected


@pytest.mark.parametrize("device_name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.4), ("NVIDIA GH200 480GB", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("AMD Instinct MI250X/MI250", 191.5), ("AMD Instinct MI300X", 1307.4),
    ("AMD Instinct MI325X", 1307.4), ("NVIDIA GeForce RTX 4090", None), ("", None),
])
def test_the_peak_table_by_device_name(device_name, peak):
    assert peak_tflops(device_name) == peak


def test_a_cpu_has_no_peak_unless_given():
    assert device_peak(torch.device("cpu")) == (None, "peak unknown: a CPU")
    assert device_peak(torch.device("cpu"), 2.5) == (2.5, "--peak-tflops")


@pytest.mark.parametrize("peak", [None, 1e-6])
def test_the_trainer_logs_tflops_and_mfu(peak):
    lines: list[str] = []
    config = TrainConfig(steps=3, batch_size=4, seq_len=32, log_every=1, data_workers=0,
                         eval_every=0, peak_tflops=peak)
    history = Trainer(config, CPU, log=lines.append).train()
    flops = preset("tiny").training_flops_per_token(32)
    for metrics in history:
        assert metrics["tflops_per_device"] == pytest.approx(metrics["tokens_per_s"] * flops
                                                             / 1e12)
        # in-process loading (no workers): every step waits for its batch
        assert 0 < metrics["data_wait_ms"] < metrics["step_ms"]
        assert metrics["max_allocated_gib"] is None and metrics["max_reserved_gib"] is None
        if peak is None:
            assert metrics["mfu"] is None
        else:
            assert metrics["mfu"] == pytest.approx(metrics["tflops_per_device"] / peak)
    steps = [line for line in lines if line.startswith("step ")]
    assert all(("MFU" in line) == (peak is not None) for line in steps), steps
    assert any(line.startswith("mfu: against 1e-06 TFLOP/s per device (--peak-tflops)")
               for line in lines) == (peak is not None)


def test_peak_tflops_must_be_positive():
    with pytest.raises(ValueError, match=r"^peak_tflops"):
        TrainConfig(peak_tflops=0.0)
