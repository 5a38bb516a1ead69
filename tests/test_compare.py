"""The report's comparison, tuned (issue 25): one search per space at one budget, and the leaderboard."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch

from prado_dist import compare
from prado_dist.comparison.leaderboard import ranked, write_markdown
from prado_dist.comparison.measures import bootstrap_intervals
from prado_dist.comparison.runner import ComparisonSettings, check_same_comparison, comparison_identity, load_spaces
from prado_dist.engine.metrics import Counts, metrics_from_counts
from prado_dist.search import SearchError
from tests.conftest import local_ray


def test_bootstrap_intervals_hold_the_scores_and_narrow_with_more_images() -> None:
    confusion = torch.tensor([[30, 2, 0], [5, 20, 1], [0, 0, 2]])
    scores = metrics_from_counts(Counts(confusion, 0.0, int(confusion.sum())), ["a", "b", "c"], "")
    small = bootstrap_intervals(confusion)
    for name in ("accuracy", "balanced_accuracy"):
        low, high = small[name]
        assert low < scores[name] < high
    large = bootstrap_intervals(confusion * 10)  # the same proportions over ten times the images
    assert large["accuracy"][1] - large["accuracy"][0] < 0.5 * (small["accuracy"][1] - small["accuracy"][0])
    assert bootstrap_intervals(torch.diag(torch.tensor([5, 7, 3])))["balanced_accuracy"] == (1.0, 1.0)


def row(model: str, val: float, test: float) -> dict:
    return {
        "space": model,
        "model": model,
        "trainable_params": 1234567,
        "gflops": 0.5,
        "train_images_per_s": 80.0,
        "report_test_accuracy": None,
        "report_config_val": 0.4,
        "best_val": val,
        **{f"test_{key}{end}": test for key in ("accuracy", "balanced_accuracy") for end in ("", "_low", "_high")},
        "trials": 3,
        "epochs": 12,
        "wall_s": 90.0,
        "search": f"c-{model}",
        "best_trial": "t1",
    }


def test_the_table_ranks_by_validation_never_by_test(tmp_path: Path) -> None:
    rows = ranked([row("a", val=0.6, test=0.9), row("b", val=0.8, test=0.5)], mode="max")
    assert [r["model"] for r in rows] == ["b", "a"]
    lines = write_markdown(rows, "val_balanced_accuracy", tmp_path / "t.md").read_text().splitlines()
    assert "tuned, val. balanced accuracy" in lines[0]
    assert lines[2].startswith("| b | 1,234,567 | 0.500 | 80 | – | 0.400 | 0.800 | 0.500 [0.500, 0.500]")
    assert lines[2].endswith("| 3 / 12 | 1.5 min |")


def test_a_comparison_refuses_what_would_make_its_table_unfair_or_ambiguous(tmp_path: Path) -> None:
    with pytest.raises(SearchError, match="twice"):
        load_spaces(ComparisonSettings(spaces=["demo", "demo"], data_dir=None))
    by_loss = tmp_path / "by_loss.yaml"
    by_loss.write_text(Path("search_spaces/demo.yaml").read_text() + "\nmetric: val_loss\nmode: min\n")
    with pytest.raises(SearchError, match="different metrics"):
        load_spaces(ComparisonSettings(spaces=["demo", str(by_loss)], data_dir=None))
    started = comparison_identity(ComparisonSettings(spaces=["demo"], data_dir=None, overrides={"epochs": 2}))
    now = comparison_identity(ComparisonSettings(spaces=["demo"], data_dir=None, overrides={"epochs": 3}))
    with pytest.raises(SearchError, match="overrides"):
        check_same_comparison(started, now)


def compare_args(folder: Path, data: Path, *more: str) -> list[str]:
    return [
        *("--spaces", "demo", "resnet29", "--profile", "quick", "--budget-epochs", "4", "--num-cpus", "2"),
        *("--set", "image_size=32", "--data", str(data), "--storage", str(folder / "runs")),
        *("--mlflow-uri", f"sqlite:///{folder}/mlflow.db", "--name", "cmp", *more),
    ]


def runs_of(db_path: Path) -> dict[str, dict]:
    """run name -> status and the run it is nested under."""
    with sqlite3.connect(db_path) as db:
        rows = db.execute(
            "select r.name, r.status, r.run_uuid, (select value from tags t where t.run_uuid = r.run_uuid "
            "and t.key = 'mlflow.parentRunId') from runs r"
        ).fetchall()
    return {name: {"status": status, "id": run_id, "parent": parent} for name, status, run_id, parent in rows}


@pytest.mark.ray
@pytest.mark.slow
def test_a_comparison_tables_each_search_under_one_parent_and_resumes_without_training_again(
    small_demo: Path, tmp_path: Path
) -> None:
    with local_ray(num_cpus=2):
        assert compare.main(compare_args(tmp_path, small_demo)) == 0
    folder = tmp_path / "runs" / "cmp"
    state = json.loads((folder / "comparison.json").read_text())
    rows = json.loads(json.dumps(state["rows"]))  # a copy: the resume below is given a state without one
    assert set(rows) == {"demo", "resnet29"}
    assert rows["resnet29"]["trainable_params"] == 4_088_837  # the report's count, from the searched checkpoint
    assert rows["demo"]["trainable_params"] == 624_853
    for r in rows.values():
        assert r["epochs"] == 4  # the equal budget, spent
        assert r["test_balanced_accuracy_low"] <= r["test_balanced_accuracy"] <= r["test_balanced_accuracy_high"]
        assert r["gflops"] > 0 and r["train_images_per_s"] > 0 and r["report_config_val"] is not None
        # The tuned figure is the best of all trials, the report's configuration among them: its last
        # epoch's checkpoint, when the budget ran out on it, is kept too.
        assert r["best_val"] >= r["report_config_val"]
    assert len((folder / "leaderboard.csv").read_text().splitlines()) == 3
    assert (folder / "leaderboard.png").stat().st_size > 0
    runs = runs_of(tmp_path / "mlflow.db")
    parent = runs["cmp"]
    assert parent["status"] == "FINISHED" and parent["id"] == state["parent_run_id"]
    assert runs["cmp-demo"]["parent"] == parent["id"] and runs["cmp-resnet29"]["parent"] == parent["id"]
    trials = sorted(name for name, run in runs.items() if run["parent"] == runs["cmp-resnet29"]["id"])
    assert trials
    # Killed after its last search ended, before that search's row was written: the resume reads the
    # search back (tests its best checkpoint again) and trains nothing.
    del state["rows"]["resnet29"]
    (folder / "comparison.json").write_text(json.dumps(state))
    with local_ray(num_cpus=2):
        assert compare.main(compare_args(tmp_path, small_demo, "--resume")) == 0
    again = json.loads((folder / "comparison.json").read_text())["rows"]["resnet29"]
    assert (
        again["best_val"] == rows["resnet29"]["best_val"]
        and again["test_accuracy"] == rows["resnet29"]["test_accuracy"]
    )
    assert again["wall_s"] == pytest.approx(rows["resnet29"]["wall_s"], abs=1.0)  # the search's, not the re-read's
    runs_after = runs_of(tmp_path / "mlflow.db")
    assert sorted(n for n, r in runs_after.items() if r["parent"] == runs["cmp-resnet29"]["id"]) == trials
    assert len(runs_after) == len(runs) and runs_after["cmp"]["status"] == "FINISHED"
    with pytest.raises(SystemExit):  # --spaces is required
        compare.main(["--resume"])
    code = compare.main(compare_args(tmp_path, small_demo, "--resume", "--set", "epochs=3"))
    assert code == 2  # another --set than it started with: refused before Ray starts
