"""What a training step achieves against what the device can do: TFLOP/s and MFU.

MFU (model FLOPs utilisation) is the model's FLOPs per second
(:meth:`eurocore.model.ModelConfig.training_flops_per_token` times tokens per second, per
device) over the device's dense bf16 peak. The peaks are the vendors' datasheet figures
without sparsity; a device not in the table has no peak ("peak unknown") unless the run
sets ``peak_tflops``.
"""

from __future__ import annotations

import re

import torch

# (device-name pattern, dense bf16 TFLOP/s of one device as torch sees it), first match wins.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"GH200", 989.4),          # NVIDIA GH200 datasheet: 1,979 TFLOPS with sparsity
    (r"H200", 989.4),           # NVIDIA H200 SXM: 1,979 with sparsity
    (r"H100.*NVL", 835.5),      # NVIDIA H100 NVL: 1,671 with sparsity
    (r"H100.*PCIe", 756.5),     # NVIDIA H100 PCIe: 1,513 with sparsity
    (r"H100", 989.4),           # NVIDIA H100 SXM: 1,979 with sparsity
    (r"A100", 312.0),           # NVIDIA A100: 312 dense
    (r"MI250X?", 191.5),        # AMD MI250X: 383 for the module, one GCD per device (LUMI)
    (r"MI300X", 1307.4),        # AMD MI300X: 1,307.4 dense
    (r"MI325X", 1307.4),        # AMD MI325X: 1,307.4 dense
)


def peak_tflops(device_name: str | None) -> float | None:
    """The dense bf16 peak of the device called ``device_name`` (as
    ``torch.cuda.get_device_name`` says it), None when it is not in the table."""
    if not device_name:
        return None
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops
    return None


def device_peak(device: torch.device, override: float | None = None) -> tuple[float | None, str]:
    """(peak TFLOP/s, where it comes from) for ``device``: ``override`` when given, else the
    table's figure for a GPU, else (None, why)."""
    if override is not None:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "peak unknown: a CPU"
    name = torch.cuda.get_device_name(device)
    peak = peak_tflops(name)
    return peak, (f"{name}, dense bf16" if peak is not None else
                  f"peak unknown: {name} is not in the table (--peak-tflops sets it)")
