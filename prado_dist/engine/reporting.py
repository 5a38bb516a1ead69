"""What a person looks at after a run or a search: per-epoch lines, a confusion matrix, learning
curves, every trial's validation curve and each searched parameter's effect."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402


def epoch_line(metrics: dict[str, float], epochs: int) -> str:
    """One readable line per epoch."""
    return (
        f"epoch {int(metrics['epoch']) + 1:>3}/{epochs}  lr {metrics['lr']:.2e}  "
        f"train loss {metrics['train_loss']:.4f} acc {metrics['train_accuracy']:.3f}  "
        f"val loss {metrics['val_loss']:.4f} acc {metrics['val_accuracy']:.3f} "
        f"bal-acc {metrics['val_balanced_accuracy']:.3f} f1 {metrics['val_macro_f1']:.3f}  "
        f"{metrics['images_per_second']:.0f} img/s"
    )


def confusion_table(confusion: torch.Tensor, classes: Sequence[str]) -> str:
    """The confusion matrix as text (rows: true painter, columns: predicted)."""
    width = max(8, *(len(name) + 1 for name in classes))
    lines = ["true \\ pred".ljust(width) + "".join(name.rjust(width) for name in classes)]
    for name, row in zip(classes, confusion.tolist(), strict=True):
        lines.append(name.ljust(width) + "".join(str(value).rjust(width) for value in row))
    return "\n".join(lines)


def write_confusion_csv(confusion: torch.Tensor, classes: Sequence[str], path: Path) -> Path:
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["true\\predicted", *classes])
        for name, row in zip(classes, confusion.tolist(), strict=True):
            writer.writerow([name, *row])
    return path


def plot_confusion(confusion: torch.Tensor, classes: Sequence[str], path: Path, title: str = "") -> Path:
    """Confusion matrix heat map, each row normalised to recall, with the raw counts written in."""
    counts = confusion.double()
    recall = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    figure, axes = plt.subplots(figsize=(5.5, 4.8))
    image = axes.imshow(recall.numpy(), cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axes.set_yticks(range(len(classes)), classes)
    axes.set_xlabel("predicted painter")
    axes.set_ylabel("true painter")
    for i in range(len(classes)):
        for j in range(len(classes)):
            colour = "white" if recall[i, j] > 0.5 else "black"
            axes.text(j, i, int(confusion[i, j]), ha="center", va="center", color=colour)
    figure.colorbar(image, ax=axes, label="fraction of the true painter's images")
    axes.set_title(title or "test confusion matrix")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_learning_curves(history: Sequence[dict[str, float]], path: Path, title: str = "") -> Path:
    """Loss and accuracy per epoch for training and validation, and the learning rate."""
    epochs = [int(m["epoch"]) + 1 for m in history]
    figure, (loss_axes, accuracy_axes, lr_axes) = plt.subplots(1, 3, figsize=(13, 3.8))
    loss_axes.plot(epochs, [m["train_loss"] for m in history], label="train")
    loss_axes.plot(epochs, [m["val_loss"] for m in history], label="validation")
    loss_axes.set_title("loss")
    accuracy_axes.plot(epochs, [m["train_accuracy"] for m in history], label="train accuracy")
    accuracy_axes.plot(epochs, [m["val_accuracy"] for m in history], label="val accuracy")
    accuracy_axes.plot(epochs, [m["val_balanced_accuracy"] for m in history], label="val balanced accuracy")
    accuracy_axes.set_ylim(0, 1)
    accuracy_axes.set_title("accuracy")
    lr_axes.plot(epochs, [m["lr"] for m in history])
    lr_axes.set_yscale("log")
    lr_axes.set_title("learning rate")
    for axes in (loss_axes, accuracy_axes, lr_axes):
        axes.set_xlabel("epoch")
        axes.grid(alpha=0.3)
    loss_axes.legend()
    accuracy_axes.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_trial_curves(
    curves: dict[str, list[tuple[int, float]]], metric: str, path: Path, highlight: Sequence[str] = ()
) -> Path:
    """Every trial's validation curve in one figure; early-stopped trials end early."""
    figure, axes = plt.subplots(figsize=(7.5, 4.5))
    for name, points in sorted(curves.items()):
        if not points:
            continue
        epochs, values = zip(*points, strict=True)
        emphasised = name in highlight
        axes.plot(
            epochs,
            values,
            marker="o",
            markersize=3,
            linewidth=2.2 if emphasised else 1.0,
            alpha=1.0 if emphasised else 0.6,
            label=name if emphasised or len(curves) <= 12 else None,
        )
    axes.set_xlabel("epoch")
    axes.set_ylabel(metric)
    axes.grid(alpha=0.3)
    axes.set_title(f"{metric} of every trial")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


@dataclass(frozen=True)
class ParameterAxis:
    """How a searched parameter is drawn: over its searched range (on a log scale for a log-uniform
    one), or as the categories of a choice (in order)."""

    log: bool = False
    categories: tuple[Any, ...] = ()
    limits: tuple[float, float] | None = None  # the searched range: where trials landed within it shows


def parameter_points(
    trials: Iterable[dict[str, Any]], name: str, axis: ParameterAxis
) -> tuple[list[float], list[float], list[bool]]:
    """Each scored trial's value of `name` (a category's position for a choice), best score, and
    whether it was stopped early. Trials that failed before scoring have no point, nor has a value
    outside a choice's categories (a search resumed with an edited space)."""
    positions, scores, stopped = [], [], []
    for trial in trials:
        value = trial["config"].get(name)
        if trial.get("best") is None or value is None or (axis.categories and value not in axis.categories):
            continue
        positions.append(float(axis.categories.index(value)) if axis.categories else float(value))
        scores.append(float(trial["best"]))
        stopped.append(bool(trial["stopped_early"]))
    return positions, scores, stopped


FULL_TRIAL = {"color": "tab:blue", "label": "ran all epochs"}
STOPPED_TRIAL = {"facecolors": "none", "edgecolors": "tab:blue", "label": "stopped early"}


def plot_parameter_effects(
    trials: dict[str, dict[str, Any]], axes_by_name: dict[str, ParameterAxis], metric: str, path: Path, best: str
) -> Path:
    """One panel per searched parameter: every trial's best `metric` against the value it tried.

    Optuna's `plot_slice` draws only trials that ran to the end; here trials ASHA stopped are drawn
    too, hollow, because their scores are partial-budget ones and usually most of a search's trials.
    """
    rows = math.ceil(len(axes_by_name) / 4)  # at most 4 panels a row, rows as full as they can be
    columns = math.ceil(len(axes_by_name) / rows)
    figure, grid = plt.subplots(rows, columns, figsize=(3.4 * columns, 2.9 * rows), squeeze=False, sharey=True)
    for panel, (name, axis) in zip(grid.flat, axes_by_name.items(), strict=False):
        positions, scores, stopped = parameter_points(trials.values(), name, axis)
        for cut_short, style in ((False, FULL_TRIAL), (True, STOPPED_TRIAL)):
            points = [(x, y) for x, y, early in zip(positions, scores, stopped, strict=True) if early == cut_short]
            if points:
                panel.scatter(*zip(*points, strict=True), s=22, **style)
        best_points = parameter_points([trials[best]], name, axis)
        if best_points[0]:
            panel.scatter(best_points[0], best_points[1], marker="*", color="tab:red", s=140, label="best trial")
        _draw_x_axis(panel, axis)
        panel.set_xlabel(name)
        panel.grid(alpha=0.3)
    for panel in grid[:, 0]:
        panel.set_ylabel(f"best {metric}")
    for panel in list(grid.flat)[len(axes_by_name) :]:
        panel.set_visible(False)
    grid.flat[0].legend(fontsize=7, loc="best")
    figure.suptitle(f"each trial's best {metric} against the value it tried")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _draw_x_axis(panel: plt.Axes, axis: ParameterAxis) -> None:
    """A choice's categories, or the searched range with a small margin (log-scaled where drawn so)."""
    if axis.categories:
        panel.set_xticks(range(len(axis.categories)), [str(value) for value in axis.categories])
        panel.set_xlim(-0.5, len(axis.categories) - 0.5)
    elif axis.log:
        panel.set_xscale("log")
        panel.xaxis.set_minor_formatter(NullFormatter())  # within one decade they overprint each other
    if axis.limits and axis.log:
        panel.set_xlim(axis.limits[0] / 1.25, axis.limits[1] * 1.25)
    elif axis.limits:
        margin = 0.04 * ((axis.limits[1] - axis.limits[0]) or 1)
        panel.set_xlim(axis.limits[0] - margin, axis.limits[1] + margin)
