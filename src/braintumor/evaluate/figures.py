"""The evaluation figures as matplotlib Figures: confusion matrix, ROC curves, reliability diagram,
training curves.

Figures are built as ``matplotlib.figure.Figure`` objects, never through ``pyplot``: no global state,
no GUI backend to select, nothing to close, safe in the app's worker threads; ``savefig`` to PNG
renders with matplotlib's Agg canvas whatever backend pyplot uses. :func:`save_png` writes atomically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from braintumor.core import atomic
from braintumor.evaluate.calibration import ReliabilityBins
from braintumor.evaluate.metrics import row_normalised

DPI = 120


def save_png(figure: Figure, path: Path) -> None:
    """Write ``figure`` as a PNG at ``path`` atomically (temporary file, then rename)."""
    with atomic.atomic_path(Path(path), suffix=".png") as tmp:
        # No "Software" metadata: the same figure gives the same bytes across matplotlib patch releases.
        figure.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})


def confusion_figure(counts: np.ndarray, class_names: Sequence[str], title: str) -> Figure:
    """Confusion matrix, rows actual and columns predicted: colour = row share, text = count and share."""
    shares = row_normalised(counts)
    k = len(class_names)
    figure = Figure(figsize=(1.2 * k + 2.2, 1.1 * k + 1.6))
    ax = figure.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the actual class")
    for a in range(k):
        for p in range(k):
            ax.text(p, a, f"{counts[a, p]}\n{shares[a, p]:.0%}", ha="center", va="center", fontsize=9,
                    color="white" if shares[a, p] > 0.5 else "black")
    ax.set_xticks(range(k), class_names, rotation=30, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    return figure


def roc_figure(curves: Mapping[str, pd.DataFrame], aucs: Mapping[str, float | None], title: str) -> Figure:
    """One-vs-rest ROC curve per class (columns fpr, tpr), its AUC in the legend, and the chance diagonal."""
    figure = Figure(figsize=(5.2, 4.8))
    ax = figure.subplots()
    for name, curve in curves.items():
        auc = aucs.get(name)
        ax.plot(curve["fpr"], curve["tpr"], label=f"{name} (AUC {auc:.3f})" if auc is not None else name)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    return figure


def _reliability_panel(ax, bins: ReliabilityBins, label: str, ece: float) -> None:
    filled = bins.counts > 0
    width = np.diff(bins.edges)
    centres = bins.edges[:-1] + width / 2
    ax.bar(centres[filled], bins.accuracy[filled], width=width[filled], edgecolor="black", linewidth=0.5,
           alpha=0.8, label="accuracy")
    # The gap spans accuracy to mean confidence: above the bar when over-confident, inside it when under-.
    ax.bar(centres[filled], np.abs(bins.confidence - bins.accuracy)[filled],
           bottom=np.minimum(bins.confidence, bins.accuracy)[filled], width=width[filled], fill=False,
           edgecolor="tab:red", linewidth=0.8, hatch="//", label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top probability)")
    ax.set_title(f"{label}: ECE {ece:.3f}")


def reliability_figure(before: ReliabilityBins, after: ReliabilityBins, ece_before: float, ece_after: float,
                       title: str) -> Figure:
    """Reliability diagrams side by side: the model's probabilities, then temperature-scaled ones."""
    figure = Figure(figsize=(9, 4.2))
    left, right = figure.subplots(1, 2, sharey=True)
    _reliability_panel(left, before, "as trained", ece_before)
    _reliability_panel(right, after, "temperature-scaled", ece_after)
    left.set_ylabel("accuracy")
    left.legend(loc="upper left", fontsize=8)
    figure.suptitle(title)
    return figure


def training_curves_figure(curves: pd.DataFrame) -> Figure:
    """Loss and accuracy per epoch (training and validation) across phases, a line where each phase starts."""
    figure = Figure(figsize=(10, 4))
    axes = figure.subplots(1, 2)
    for ax, metric in zip(axes, ("loss", "accuracy")):
        ax.plot(curves["epoch"], curves[metric], marker="o", markersize=3, label=f"training {metric}")
        ax.plot(curves["epoch"], curves[f"val_{metric}"], marker="o", markersize=3, label=f"validation {metric}")
        for phase, first in curves.groupby("phase", sort=False)["epoch"].min().items():
            ax.axvline(first - 0.5, color="grey", linestyle=":", linewidth=1)
            ax.annotate(phase, (first - 0.4, 1.0), xycoords=("data", "axes fraction"), va="top", fontsize=8, color="grey")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.legend(fontsize=8)
    figure.suptitle("training curves")
    return figure
