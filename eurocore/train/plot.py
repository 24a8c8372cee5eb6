"""``eurocore plot PATH``: a training run's metrics as a PNG.

    eurocore plot runs/tiny-20261201-120000          # -> runs/tiny-.../metrics.png
    path = plot("runs/tiny-...")                     # the same from Python

(``eurocore plot RESULTS.json`` draws benchmark results instead: the CLI hands a file to
``eurocore.benchmarks.plot.plot_results``, a layer above this one.)

A directory is a run: its ``metrics.jsonl`` (:func:`eurocore.train.metrics.read_metrics`)
drawn as one figure of four panels: loss (training, and validation where evaluated),
learning rate, throughput (tokens/s, all devices) and MFU (TFLOP/s per device where the
device's peak is unknown), over the steps, with a dashed line where the run resumed.
:func:`plot_run` draws parsed records and :func:`save_figure` writes any figure.
matplotlib (the ``plot`` extra) is needed, with its Agg backend: no display.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from eurocore.train.metrics import METRICS_FILE, read_metrics
from eurocore.utils.files import check_writable_file, write_bytes_atomically

PLOT_FILE = "metrics.png"  # in the run directory, unless told otherwise


def plot(path: str | os.PathLike[str], output: str | os.PathLike[str] | None = None) -> Path:
    """Plots a run directory's metrics.jsonl (see :func:`plot_run_dir`) and returns the
    PNG's path. Raises ValueError naming ``PATH`` when it does not exist or is a file."""
    source = Path(path)
    if source.is_dir():
        return plot_run_dir(source, output)
    if source.exists():
        raise ValueError(f"PATH: {str(source)!r} is a file; expected a run directory, "
                         f"which holds {METRICS_FILE}")
    raise ValueError(f"PATH: {str(source)!r} does not exist (expected a run directory, "
                     f"the training run's --output-dir)")


def plot_run_dir(run_dir: str | os.PathLike[str],
                 output: str | os.PathLike[str] | None = None) -> Path:
    """Draws ``run_dir/metrics.jsonl`` (:func:`plot_run`) into ``output`` (default
    ``run_dir/metrics.png``), written atomically; returns its path.

    Raises:
        ValueError: metrics.jsonl is missing, unreadable or holds no logged step (naming
            RUN_DIR and the file), or ``output`` cannot be written (naming --output).
        ImportError: matplotlib is not installed (the message says how to install it).
    """
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / METRICS_FILE, arg="RUN_DIR")
    if not any(r.get("kind") == "step" for r in records):
        raise ValueError(f"RUN_DIR: {str(run_dir / METRICS_FILE)!r} holds no logged step yet")
    target = check_writable_file("--output", run_dir / PLOT_FILE if output is None else output)
    figure = plot_run(records, title=run_dir.resolve().name)
    return save_figure(figure, target)


def plot_run(records: list[dict[str, Any]], title: str | None = None) -> Any:
    """The figure (a ``matplotlib.figure.Figure``, 2 x 2 panels) of a run's metrics.jsonl
    records: loss, learning rate, tokens/s and MFU over the steps. A step logged twice
    (a file written otherwise than by the trainer) counts once, its last line. Raises
    ValueError when ``records`` hold no step, ImportError without matplotlib."""
    by_step = {r["step"]: r for r in records
               if r.get("kind") == "step" and isinstance(r.get("step"), int)}
    if not by_step:
        raise ValueError("records: no step records (kind 'step') to plot")
    figure = _figure()
    steps = sorted(by_step)
    rows = [by_step[s] for s in steps]
    loss, lr, speed, mfu = figure.subplots(2, 2, sharex=True).flat

    def series(key: str, scale: float = 1.0) -> tuple[list[int], list[float]]:
        kept = [(s, r[key] * scale) for s, r in zip(steps, rows, strict=True)
                if isinstance(r.get(key), (int, float))]
        return [s for s, _ in kept], [v for _, v in kept]

    loss.plot(*series("loss"), label="train")
    valid = series("valid_loss")
    if valid[0]:
        loss.plot(*valid, marker="o", label="validation")
    loss.set(title="loss", ylabel="nats per token")
    loss.legend()
    lr.plot(*series("lr"))
    lr.set(title="learning rate")
    speed.plot(*series("tokens_per_s"))
    speed.set(title="throughput", ylabel="tokens/s (all devices)", xlabel="step")
    measured = series("mfu", 100.0)
    if measured[0]:
        mfu.plot(*measured)
        mfu.set(title="MFU", ylabel="% of the peak", xlabel="step")
    else:  # a CPU, or a GPU not in the table: the achieved rate alone
        mfu.plot(*series("tflops_per_device"))
        mfu.set(title="TFLOP/s per device (peak unknown: no MFU)", xlabel="step")
    resumes = [r["start_step"] for r in records
               if r.get("kind") == "run" and isinstance(r.get("start_step"), int)
               and r["start_step"] > 0]
    for axes in (loss, lr, speed, mfu):
        axes.grid(alpha=0.3)
        for step in resumes:
            axes.axvline(step, color="grey", linestyle="--", linewidth=0.8)
    run = next((r for r in records if r.get("kind") == "run"), {})
    about = _describe_run(run)
    if title or about:
        figure.suptitle(" — ".join(part for part in (title, about) if part))
    return figure


def save_figure(figure: Any, path: str | os.PathLike[str]) -> Path:
    """Writes ``figure`` as a PNG to ``path`` atomically (a reader never sees half of it);
    returns the path."""
    return write_bytes_atomically(path, lambda f: figure.savefig(f, format="png", dpi=100))


def _figure() -> Any:
    """A 12 x 8 inch figure drawn by the Agg backend (no pyplot: no global state, no
    display), or ImportError saying how to install matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("eurocore plot needs matplotlib: pip install eurocore[plot]"
                          ) from None
    figure = Figure(figsize=(12, 8), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _describe_run(run: dict[str, Any]) -> str:
    """'tiny, tp 2 x pp 1 x dp 1 on 2 x NVIDIA H100' from a run record ('' if bare)."""
    config, layout = run.get("config") or {}, run.get("layout") or {}
    parts = []
    model = (os.path.basename(os.path.normpath(config["init_from_hf"]))
             if config.get("init_from_hf") else config.get("preset"))
    if model:
        parts.append(str(model))
    if layout:
        parts.append(f"tp {layout.get('tp')} x pp {layout.get('pp')} x dp {layout.get('dp')}")
    if run.get("world_size") and run.get("device"):
        parts.append(f"on {run['world_size']} x {run['device']}")
    return ", ".join(parts)
