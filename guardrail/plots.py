"""PNG plots for analysis output and gate reports, drawn with matplotlib.

matplotlib is an optional dependency (the ``plots`` extra); every function
imports it lazily and raises a clear error when it is missing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from guardrail.errors import GuardrailError

logger = logging.getLogger(__name__)


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise GuardrailError("plots need matplotlib; install it with `pip install 'guardrail[plots]'`") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, path: Path) -> Path:
    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    logger.info("Wrote plot %s", path)
    return path


def plot_spectra(analysis: dict[str, Any], path: Path) -> Path:
    """Plot the mean normalised singular values (s_i / s_1) of the safety gradient per layer type."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    by_type: dict[str, list[list[float]]] = {}
    for example in analysis["examples"]:
        for matrix in example["matrices"]:
            values = matrix["singular_values"]
            if values and values[0] > 0:
                by_type.setdefault(matrix["layer_type"], []).append([value / values[0] for value in values])
    for layer_type, rows in by_type.items():
        length = min(len(row) for row in rows)
        mean = [sum(row[i] for row in rows) / len(rows) for i in range(length)]
        axis.semilogy(range(1, length + 1), mean, label=layer_type)
    axis.set(xlabel="singular value index i", ylabel="s_i / s_1 (mean over matrices)", title="Safety-gradient spectrum per layer type")
    axis.legend(fontsize=8)
    return _save(figure, path)


def plot_cer(analysis: dict[str, Any], path: Path) -> Path:
    """Plot CER(k) for k = 1..64 per layer type, computed from the stored singular values.

    The stored values are the top 64 of each matrix, so the curve is
    normalised by the full energy taken from the matrix norm.
    """
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    by_type: dict[str, list[list[float]]] = {}
    for example in analysis["examples"]:
        for matrix in example["matrices"]:
            total = matrix["norm"] ** 2
            if total == 0:
                continue
            running, curve = 0.0, []
            for value in matrix["singular_values"]:
                running += value**2
                curve.append(min(1.0, running / total))
            by_type.setdefault(matrix["layer_type"], []).append(curve)
    for layer_type, curves in by_type.items():
        length = min(len(curve) for curve in curves)
        axis.plot(range(1, length + 1), [sum(curve[i] for curve in curves) / len(curves) for i in range(length)], label=layer_type)
    axis.axvline(20, color="grey", linestyle=":", label="k = 20")
    axis.set(xlabel="k", ylabel="CER(k) (mean over matrices)", ylim=(0, 1.02), title="Cumulative energy of the top-k directions")
    axis.legend(fontsize=8)
    return _save(figure, path)


def plot_overlaps(analysis: dict[str, Any], path: Path, k: str = "20") -> Path:
    """Plot the pairwise top-k subspace overlap of the examples as a heat map."""
    plt = _pyplot()
    names = [example["id"] for example in analysis["examples"]]
    index = {name: position for position, name in enumerate(names)}
    matrix = [[1.0 if i == j else 0.0 for j in range(len(names))] for i in range(len(names))]
    for row in analysis["overlaps"]:
        value = row["overlap"][k]
        matrix[index[row["first"]]][index[row["second"]]] = value
        matrix[index[row["second"]]][index[row["first"]]] = value
    figure, axis = plt.subplots(figsize=(1.2 * len(names) + 2, 1.0 * len(names) + 1.5))
    image = axis.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    axis.set(xticks=range(len(names)), yticks=range(len(names)), title=f"Top-{k} subspace overlap")
    axis.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    axis.set_yticklabels(names, fontsize=8)
    for i in range(len(names)):
        for j in range(len(names)):
            axis.text(j, i, f"{matrix[i][j]:.2f}", ha="center", va="center", color="white" if matrix[i][j] < 0.6 else "black", fontsize=7)
    figure.colorbar(image, ax=axis)
    return _save(figure, path)


def plot_patch_trace(trace: dict[str, Any], path: Path) -> Path:
    """Plot screened refusal and over-refusal per epoch for every patch attempt, with the targets."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4))
    for attempt in trace["attempts"]:
        epochs = [epoch["epoch"] for epoch in attempt["epochs"]]
        label = f"{attempt['example_id']} lr {attempt['learning_rate']:.0e}"
        line = axis.plot(epochs, [epoch["screen"]["refusal"] for epoch in attempt["epochs"]], marker="o", label=f"refusal, {label}")[0]
        axis.plot(epochs, [epoch["screen"]["over_refusal"] for epoch in attempt["epochs"]], marker="x", linestyle="--", color=line.get_color(), label=f"over-refusal, {label}")
    targets = trace.get("targets") or {}
    if "min_refusal" in targets:
        axis.axhline(targets["min_refusal"], color="green", linestyle=":", label="refusal target")
    if "max_over_refusal" in targets:
        axis.axhline(targets["max_over_refusal"], color="red", linestyle=":", label="over-refusal limit")
    axis.set(xlabel="epoch", ylabel="rate on the screening sets", ylim=(-0.02, 1.02), title="One-shot patch, per epoch")
    axis.legend(fontsize=7)
    return _save(figure, path)
