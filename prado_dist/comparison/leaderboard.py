"""The comparison's table: one row per searched space, as CSV, Markdown and a plot of score against cost.

Rows are ranked by the best validation score, the figure each search selected on; the test scores
(one evaluation per search, with bootstrap intervals) are reported, never used to choose."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from prado_dist.comparison.measures import bootstrap_intervals, model_size, training_throughput
from prado_dist.comparison.reference import report_test_accuracy
from prado_dist.data import PreparedData
from prado_dist.engine.reporting import plt  # the Agg backend, chosen once there
from prado_dist.search import SearchOutcome, SearchSpace

COLUMNS = [
    "space",
    "model",
    "trainable_params",
    "gflops",
    "train_images_per_s",
    "report_test_accuracy",
    "report_config_val",
    "best_val",
    "test_accuracy",
    "test_accuracy_low",
    "test_accuracy_high",
    "test_balanced_accuracy",
    "test_balanced_accuracy_low",
    "test_balanced_accuracy_high",
    "trials",
    "epochs",
    "wall_s",
    "search",
    "best_trial",
]


def leaderboard_row(
    space: SearchSpace, search: str, outcome: SearchOutcome, data: PreparedData, wall_s: float
) -> dict[str, Any]:
    """A finished search as the table shows it (`wall_s`: what this comparison measured of it)."""
    params, gflops = model_size(outcome.best_state, data)
    intervals = bootstrap_intervals(outcome.confusion)
    return {
        "space": space.name,
        "model": space.model,
        "trainable_params": params,
        "gflops": gflops,
        "train_images_per_s": training_throughput(outcome.trials),
        "report_test_accuracy": report_test_accuracy(space.model),
        "report_config_val": outcome.baseline_val,
        "best_val": outcome.best_val.get(space.metric),
        "test_accuracy": outcome.test["test_accuracy"],
        "test_accuracy_low": intervals["accuracy"][0],
        "test_accuracy_high": intervals["accuracy"][1],
        "test_balanced_accuracy": outcome.test["test_balanced_accuracy"],
        "test_balanced_accuracy_low": intervals["balanced_accuracy"][0],
        "test_balanced_accuracy_high": intervals["balanced_accuracy"][1],
        "trials": len(outcome.trials),
        "epochs": sum(trial["epochs"] for trial in outcome.trials.values()),
        "wall_s": wall_s,
        "search": search,
        "best_trial": outcome.best_trial_id,
    }


def ranked(rows: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    sign = -1 if mode == "max" else 1
    return sorted(rows, key=lambda row: sign * (row["best_val"] if row["best_val"] is not None else -sign * math.inf))


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_markdown(rows: list[dict[str, Any]], metric: str, path: Path) -> Path:
    """The table a person reads: scores to 3 places, intervals in brackets, cost as trials/epochs/time."""
    score = metric.removeprefix("val_").replace("_", " ")
    header = [
        "model",
        "trainable params",
        "GFLOPs/image",
        "train images/s",
        "report's test acc.",
        f"report's config, val. {score}",
        f"tuned, val. {score}",
        "test accuracy [95% CI]",
        "test balanced acc. [95% CI]",
        "trials / epochs",
        "wall",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            row["model"],
            f"{row['trainable_params']:,}",
            f"{row['gflops']:.3f}",
            _number(row["train_images_per_s"], "{:.0f}"),
            _number(row["report_test_accuracy"], "{:.3f}"),
            _number(row["report_config_val"], "{:.3f}"),
            _number(row["best_val"], "{:.3f}"),
            _interval(row, "test_accuracy"),
            _interval(row, "test_balanced_accuracy"),
            f"{row['trials']} / {row['epochs']}",
            f"{row['wall_s'] / 60:.1f} min",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")
    return path


def _number(value: float | None, form: str) -> str:
    return "–" if value is None else form.format(value)


def _interval(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.3f} [{row[key + '_low']:.3f}, {row[key + '_high']:.3f}]"


def plot_leaderboard(rows: list[dict[str, Any]], path: Path) -> Path:
    """Test balanced accuracy with its 95% interval (and the tuned validation score it was selected by)
    against what the search cost here in wall time: at an equal epoch budget, models differ in time."""
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        minutes, score = row["wall_s"] / 60, row["test_balanced_accuracy"]
        error = [[score - row["test_balanced_accuracy_low"]], [row["test_balanced_accuracy_high"] - score]]
        line = axis.errorbar(minutes, score, yerr=error, fmt="o", capsize=4)
        if row["best_val"] is not None:
            axis.plot(minutes, row["best_val"], "x", color=line[0].get_color())
        axis.annotate(row["model"], (minutes, score), textcoords="offset points", xytext=(6, 4))
    axis.set_xlabel("search wall time (min, this machine)")
    axis.set_ylabel("test balanced accuracy, 95% bootstrap CI (x: validation)")
    axis.set_title("the best checkpoint of each search, tested once")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
