"""A search's figures: every trial's validation curve and each searched parameter's effect."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.ticker import NullFormatter

from prado_dist.engine.reporting import plt  # the Agg backend, chosen once there
from prado_dist.search.space import Choice, LogUniform, SearchSpace


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


def parameter_axes(space: SearchSpace) -> dict[str, ParameterAxis]:
    """How each searched parameter is plotted: as it is drawn (log-uniform on a log axis)."""
    return {
        name: ParameterAxis(categories=tuple(spec.values))
        if isinstance(spec, Choice)
        else ParameterAxis(log=isinstance(spec, LogUniform), limits=(spec.low, spec.high))
        for name, spec in space.params.items()
    }


def plot_importances(importances: dict[str, float], note: str, path: Path) -> Path:
    """One bar per searched setting, the most important on top."""
    ranked = sorted(importances.items(), key=lambda item: item[1])
    figure, axes = plt.subplots(figsize=(6.5, 0.45 * len(ranked) + 1.6))
    axes.barh([name for name, _ in ranked], [value for _, value in ranked], color="tab:blue")
    axes.set_xlabel("importance (share of the score's variance)")
    axes.set_xlim(0, 1)
    axes.grid(axis="x", alpha=0.3)
    axes.set_title(textwrap.fill(note, 80), fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
