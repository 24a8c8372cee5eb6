"""What a training step achieves against what the device can do: TFLOP/s and MFU.

MFU (model FLOPs utilisation) is the model's FLOPs per second
(:meth:`eurocore.model.ModelConfig.training_flops_per_token` times tokens per second, per
device) over the device's dense bf16 peak. The peaks are the vendors' datasheet figures
without sparsity; a device not in the table has no peak ("peak unknown") unless the run
sets ``peak_tflops``.

Where the metrics go (rank 0, the logged steps only): ``OUTPUT_DIR/metrics.jsonl``
(:class:`MetricsWriter`; :func:`read_metrics` reads it back) and, when the ``tensorboard``
package is installed, TensorBoard events under ``OUTPUT_DIR/tensorboard``. :class:`Progress`
gives the console line's elapsed time and ETA.
"""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from eurocore.utils.files import write_text_atomically

# torch is imported where a device is asked about: `eurocore plot` reads metrics.jsonl
# without it.
if TYPE_CHECKING:
    import torch

METRICS_FILE = "metrics.jsonl"  # in the run's output directory
TENSORBOARD_DIR = "tensorboard"  # likewise

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
    import torch

    name = torch.cuda.get_device_name(device)
    peak = peak_tflops(name)
    return peak, (f"{name}, dense bf16" if peak is not None else
                  f"peak unknown: {name} is not in the table (--peak-tflops sets it)")


def device_name(device: torch.device) -> str:
    """What the run's metadata calls ``device``: the GPU's name, else the CPU's."""
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine() or 'unknown'})"


# -------------------------------------------------------------------------------------------
# metrics.jsonl and TensorBoard
# -------------------------------------------------------------------------------------------

# TensorBoard groups a tag's scalars by the part before "/": the loss curves together, the
# speed together, memory apart. Keys not named here go under "train/".
_TENSORBOARD_GROUPS = {"valid_loss": "valid/loss", "tokens_per_s": "speed/tokens_per_s",
                       "tokens_per_s_per_device": "speed/tokens_per_s_per_device",
                       "tflops_per_device": "speed/tflops_per_device", "mfu": "speed/mfu",
                       "step_ms": "speed/step_ms", "data_wait_ms": "speed/data_wait_ms",
                       "elapsed_s": "speed/elapsed_s",
                       "max_allocated_gib": "memory/max_allocated_gib",
                       "max_reserved_gib": "memory/max_reserved_gib"}


class MetricsWriter:
    """The run's record in its output directory ``directory``, written by rank 0:

    - ``metrics.jsonl``: one JSON object a line. The first line of each start of the run is
      ``run`` (``{"kind": "run", ...}``: config, model, layout, device, versions); then one
      ``{"kind": "step", ...}`` line per logged step with the step's metrics.
    - TensorBoard events under ``tensorboard/`` (``tensorboard=True`` and the package
      installed; :attr:`tensorboard` says whether they are written).

    A run that starts at ``start_step`` > 0 (a resume) keeps the file's lines of the steps
    before it and drops those of later steps (a killed run logged them after its last
    checkpoint; they run again), rewriting the file atomically, then appends. A run at
    step 0 starts a new file: the steps it runs replace any earlier run's. TensorBoard is
    told the same (``purge_step``: its events of steps from ``start_step`` on are hidden).
    """

    def __init__(self, directory: str | os.PathLike[str], run: dict[str, Any],
                 start_step: int, tensorboard: bool = True) -> None:
        self.path = Path(directory) / METRICS_FILE
        kept: list[str] = []
        if start_step > 0 and self.path.exists():
            text = self.path.read_text(encoding="utf-8", errors="replace")
            kept = [json.dumps(r) for r in _parse(text, str(self.path), strict=False)
                    if r.get("kind") != "step"
                    or (isinstance(r.get("step"), int) and r["step"] < start_step)]
        lines = [*kept, json.dumps({"kind": "run", **run})]
        write_text_atomically("".join(line + "\n" for line in lines), self.path)
        # Appended to, not rewritten, at each logged step: the cost stays one short write
        # however long the run. Each line goes in one write and is flushed to the kernel at
        # once, so a killed process leaves whole lines and at most a partial last one, which
        # the reader skips (and a resume drops); no fsync: the OS keeps what a killed
        # process wrote, and a step's cost stays microseconds.
        self._file: IO[str] | None = self.path.open("a", encoding="utf-8")
        self._events = _summary_writer(Path(directory) / TENSORBOARD_DIR, start_step) \
            if tensorboard else None

    @property
    def tensorboard(self) -> bool:
        """Whether TensorBoard events are written."""
        return self._events is not None

    def write(self, metrics: dict[str, Any]) -> None:
        """Records one logged step's ``metrics`` (``step`` and JSON values: numbers, None)."""
        if self._file is None:
            raise RuntimeError(f"metrics: {str(self.path)!r} was closed")
        self._file.write(json.dumps({"kind": "step", **metrics}) + "\n")
        self._file.flush()
        if self._events is not None:
            from tensorboard.compat.proto.summary_pb2 import Summary

            # One event holding every scalar of the step, not add_scalar's one event per
            # scalar: ~60 us a step instead of ~500 us (12 scalars, this 2-core machine).
            # The writer queues it; its own thread writes the file.
            summary = Summary(value=[
                Summary.Value(tag=_TENSORBOARD_GROUPS.get(key, f"train/{key}"),
                              simple_value=float(value))
                for key, value in metrics.items()
                if key != "step" and isinstance(value, (int, float))
                and not isinstance(value, bool)])
            self._events._get_file_writer().add_summary(summary, metrics["step"])

    def close(self) -> None:
        """Closes the file and flushes the TensorBoard events; later calls do nothing."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._events is not None:
            self._events.close()
            self._events = None


def _summary_writer(directory: Path, start_step: int) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter`` on ``directory``, None when the
    tensorboard package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises it when the tensorboard package is missing
        return None
    # flush_secs: a killed run loses at most the last 30 s of events (metrics.jsonl has all)
    return SummaryWriter(str(directory), purge_step=start_step, flush_secs=30)


def read_metrics(path: str | os.PathLike[str], arg: str = "metrics") -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file, in file order (``kind`` "run" or "step").

    A last line that is not whole JSON is skipped: a run killed while writing it leaves it
    so. Raises ValueError starting with ``arg`` and naming the file when it is missing or
    unreadable, or when an earlier line is not a JSON object.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{arg}: {str(file)!r} is missing (a training run with an output "
                         f"directory writes it)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{arg}: {str(file)!r} is unreadable ({err})") from None
    return _parse(text, f"{arg}: {str(file)!r}", strict=True)


def _parse(text: str, where: str, strict: bool) -> list[dict[str, Any]]:
    """The JSON objects of ``text``'s lines; the last line may be cut short (skipped).
    Another bad line raises ValueError naming ``where`` and the line (``strict``) or is
    skipped."""
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif strict and number < len(lines):
            raise ValueError(f"{where}: line {number} is not a JSON object: {line[:80]!r}")
    return records


class Progress:
    """Elapsed time and the time left of a run's steps ``first_step`` .. ``steps`` - 1 in
    this process, from the times of its logged steps.

    The ETA takes the mean time per step since this process's first logged step, so the
    steps up to it (the first step's compilation and warm-up) do not count; at the first
    logged step itself there is nothing else to go on. Times are ``time.perf_counter()``
    seconds, taken after the step's values reached the host (the logging's own wait).
    """

    def __init__(self, first_step: int, steps: int, start: float) -> None:
        self.first_step, self.steps, self.start = first_step, steps, start
        self._reference: tuple[float, int] | None = None

    def update(self, step: int, now: float) -> tuple[float, float]:
        """(seconds elapsed, seconds left) once step ``step`` is done at time ``now``."""
        elapsed = now - self.start
        if self._reference is None or step <= self._reference[1]:
            self._reference = (now, step)
            per_step = elapsed / (step - self.first_step + 1)
        else:
            then, at = self._reference
            per_step = (now - then) / (step - at)
        return elapsed, per_step * max(self.steps - 1 - step, 0)


def format_duration(seconds: float) -> str:
    """``seconds`` as the console shows it: 42s, 3m05s, 1h02m (hours go past 24)."""
    total = max(round(seconds), 0)
    if total < 60:
        return f"{total}s"
    if total < 3600:
        return f"{total // 60}m{total % 60:02d}s"
    return f"{total // 3600}h{total % 3600 // 60:02d}m"
