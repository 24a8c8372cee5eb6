"""PNG plots of the benchmarks' JSON results: :func:`plot_results` (``python -m
eurocore.benchmarks --plot`` calls it after writing its JSON; ``eurocore plot RESULTS.json``
on any results file).

    plot_results("benchmarks/results/2026-12-01-nvidia-h200.json", "plots/")

What each kind of file gives:

kernel benchmark (``python -m eurocore.benchmarks``)
    One PNG per op, one panel per variant (fwd, bwd, fwd+bwd): each implementation's
    fraction of the ceiling measured in the same run against the case's shape, one line per
    implementation. The ceiling is the matmul rate for ops that count FLOPs (attention),
    else the copy bandwidth. The shape axis names only the sizes that vary within the op.
training benchmark (``python -m eurocore.benchmarks.train``)
    One PNG: MFU per setting (tokens/s per device where the peak is unknown, as on CPUs).
checkpoint benchmark (``python -m eurocore.benchmarks.checkpoint``)
    Its bars of what training waits per save and the load times.

Needs matplotlib (the ``plot`` extra); drawn with the Agg backend (no display). Each PNG is
written atomically.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eurocore.utils.files import write_bytes_atomically

DPI = 120


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files only, no display needed). Raises
    ImportError saying how to install matplotlib when it is missing."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("matplotlib is not installed (pip install eurocore[plot])") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Writes ``fig`` to ``path`` as PNG atomically, closes it and returns the path."""
    plt = pyplot()
    try:
        return write_bytes_atomically(path, lambda f: fig.savefig(f, format="png", dpi=DPI))
    finally:
        plt.close(fig)


def plot_results(json_path: str | os.PathLike[str], out_dir: str | os.PathLike[str]
                 ) -> list[Path]:
    """Draws the results in ``json_path`` as PNGs in ``out_dir`` (created if needed), named
    ``<json stem>-<op>.png`` (kernel results) or ``<json stem>.png``; returns their paths.

    Raises:
        ValueError: the file is not JSON, or not the results of one of the benchmarks
            (the message names the file).
        ImportError: matplotlib is not installed.
    """
    json_path, out_dir = Path(json_path), Path(out_dir)
    try:
        data = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(json_path)!r}: not a readable JSON file ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(json_path)!r}: expected a benchmark's results object")
    out_dir.mkdir(parents=True, exist_ok=True)
    kind = data.get("benchmark")
    if kind == "train":
        return [plot_train(data, out_dir / f"{json_path.stem}.png")]
    if kind == "checkpoint":
        from . import checkpoint

        return [checkpoint.plot(data["rows"], out_dir / f"{json_path.stem}.png",
                                checkpoint.plot_title(data["environment"], data["settings"]))]
    if "results" in data and "ceilings" in data:
        return plot_kernels(data, out_dir, json_path.stem)
    raise ValueError(f"{str(json_path)!r}: not the results of a eurocore benchmark (no "
                     f"'benchmark' field, nor kernel 'results' and 'ceilings')")


def _title_suffix(env: dict[str, Any]) -> str:
    where = env.get("device_name", "unknown device")
    if env.get("is_cpu"):
        where += " - CPU FIGURES, not GPU performance"
    return f"{where}; torch {env.get('torch')}, {env.get('date', '')}"


def shape_labels(shapes: Sequence[dict[str, int]], sep: str = "\n") -> list[str]:
    """A short label per shape naming only the sizes that differ between ``shapes``
    (all of them when none differs), joined by ``sep``, e.g. ``seq=4096\ncausal=1``."""
    keys = list(dict.fromkeys(k for s in shapes for k in s))
    varying = [k for k in keys if len({s.get(k) for s in shapes}) > 1] or keys
    return [sep.join(f"{k}={s[k]}" for k in varying if k in s) or "-" for s in shapes]


def plot_kernels(data: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    """One PNG per op of a kernel benchmark's results (see the module docstring)."""
    plt = pyplot()
    rows = data["results"]
    ceilings = data["ceilings"]
    paths = []
    for op in dict.fromkeys(r["op"] for r in rows):
        op_rows = [r for r in rows if r["op"] == op]
        matmul = any(r.get("matmul_fraction") is not None for r in op_rows)
        key = "matmul_fraction" if matmul else "copy_fraction"
        ceiling = (f"the measured matmul rate ({ceilings['matmul_tflops']:.1f} TFLOP/s)"
                   if matmul else
                   f"the measured copy bandwidth ({ceilings['copy_gbps']:.0f} GB/s)")
        variants = list(dict.fromkeys(r["variant"] for r in op_rows))
        shapes: list[dict[str, int]] = []
        for r in op_rows:
            if r["shape"] not in shapes:
                shapes.append(r["shape"])
        many = len(shapes) > 4  # slanted one-line labels, and room for them
        labels = shape_labels(shapes, " " if many else "\n")
        impls = list(dict.fromkeys(r["impl"] for r in op_rows))
        colors = {impl: f"C{i % 10}" for i, impl in enumerate(impls)}  # alike in every panel
        width = max(3.2, 0.5 * len(shapes))
        fig, axes = plt.subplots(1, len(variants), squeeze=False, sharey=True,
                                 figsize=(max(6.0, width * len(variants)), 4.8 if many else 4.2))
        for ax, variant in zip(axes[0], variants, strict=True):
            v_rows = [r for r in op_rows if r["variant"] == variant]
            for impl in impls:
                y = [math.nan] * len(shapes)  # a shape this implementation lacks: a gap
                for r in v_rows:
                    if r["impl"] == impl and r.get(key) is not None:
                        y[shapes.index(r["shape"])] = 100 * r[key]
                if not all(math.isnan(v) for v in y):
                    ax.plot(range(len(shapes)), y, marker="o", label=impl, color=colors[impl])
            ax.axhline(100, color="grey", linewidth=0.8, linestyle="--")
            ax.set_xticks(range(len(shapes)), labels, fontsize=6 if many else 7,
                          rotation=60 if many else 0, ha="right" if many else "center")
            ax.set_title(variant, fontsize=9)
            ax.grid(axis="y", alpha=0.3)
        axes[0][0].set_ylabel(f"% of {'matmul rate' if matmul else 'copy bandwidth'}")
        axes[0][0].set_ylim(bottom=0)
        handles = [plt.Line2D([], [], color=colors[impl], marker="o") for impl in impls]
        fig.legend(handles, impls, loc="lower center", ncol=min(len(impls), 5), fontsize=7)
        dtypes = ", ".join(dict.fromkeys(r["dtype"] for r in op_rows))
        fig.suptitle(f"{op} ({dtypes}): fraction of {ceiling}\n"
                     f"{_title_suffix(data.get('environment', {}))}", fontsize=9)
        fig.tight_layout(rect=(0, 0.07, 1, 1))  # the legend below the panels
        paths.append(save_png(fig, out_dir / f"{stem}-{op}.png"))
    return paths


def plot_train(data: dict[str, Any], path: Path) -> Path:
    """Bars of each training setting's MFU (or tokens/s per device where no setting has
    an MFU: the device's peak is unknown), failed settings left out."""
    plt = pyplot()
    rows = [r for r in data["results"] if r.get("status") == "ok"]
    use_mfu = any(r.get("mfu") is not None for r in rows)
    labels = [f"{r['model']}" + (f" ({r['num_layers']} L)" if r.get("layers_cut") else "")
              + f"\nseq {r['seq_len']}\n{r['recompute']}" for r in rows]
    values = [100 * (r["mfu"] or 0.0) if use_mfu else r["tokens_per_s"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows)), 4.0))
    bars = ax.bar(range(len(rows)), values, color="#48c")
    ax.bar_label(bars, fmt="%.1f%%" if use_mfu else "%.0f", fontsize=7)
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("MFU (%)" if use_mfu else "tokens/s per device")
    ax.set_title(f"training steps, one device\n{_title_suffix(data.get('environment', {}))}",
                 fontsize=9)
    fig.tight_layout()
    return save_png(fig, path)
