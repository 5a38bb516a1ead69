"""`bench/search_efficiency.py`: `--reuse-random` picks the right recorded random search, or refuses;
`--work-dir` reads finished searches back; a bad `--plot` is refused at once."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "search_efficiency.py"


@pytest.fixture(scope="module")
def efficiency():
    sys.path.insert(0, str(BENCH.parent))  # the script imports bench/_machine.py as its neighbour
    try:
        spec = importlib.util.spec_from_file_location("search_efficiency", BENCH)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH.parent))
    return module


def line(date: str, overrides: list[str], random_best: float, budget: int = 128) -> str:
    return json.dumps(
        {
            "date": date,
            "space": "mobilenet",
            "data": "/data/dev",
            "budget_epochs": budget,
            "overrides": overrides,
            "seeds": [
                {
                    "seed": 0,
                    "random_final_best": random_best,
                    "epochs_to_reach_random_best": {"tpe_asha": None, "random": 100},
                    "random_trials": 8,
                    "random_test_accuracy": 0.5,
                }
            ],
            "curves": {"0": {"tpe_asha": [[1, 0.2]], "random": [[1, 0.3], [100, round(random_best, 4)]]}},
        }
    )


def test_reuse_takes_the_newest_random_search_with_the_same_settings(efficiency, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(efficiency, "RESULTS", tmp_path)
    (tmp_path / "search_efficiency.jsonl").write_text(
        "\n".join(
            [
                line("old", ["epochs=16", "searcher.startup_trials=10"], 0.51),
                line("new", ["epochs=16", "scheduler.grace_period=4"], 0.52),  # ASHA's and TPE's settings aside
                line("other epochs", ["epochs=8"], 0.9),
                line("other budget", ["epochs=16"], 0.9, budget=64),
            ]
        )
        + "\n"
    )
    args = argparse.Namespace(space="mobilenet", budget=128, overrides=["scheduler.grace_period=2", "epochs=16"])
    curve, fields, date = efficiency.recorded_random(args, Path("/data/dev"), 0)
    assert date == "new" and fields["random_final_best"] == 0.52 and curve[-1] == (100, 0.52)
    with pytest.raises(SystemExit, match="no recorded random search of seed 1"):
        efficiency.recorded_random(args, Path("/data/dev"), 1)
    other_epochs = argparse.Namespace(**{**vars(args), "overrides": ["epochs=12"]})
    with pytest.raises(SystemExit, match="no recorded random search of seed 0"):
        efficiency.recorded_random(other_epochs, Path("/data/dev"), 0)


def test_searches_finished_in_the_work_dir_are_read_back_not_rerun(efficiency, tmp_path, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(efficiency, "finished_outcome", lambda settings: calls.append(("read", settings.name)))
    monkeypatch.setattr(efficiency, "run_search", lambda settings: calls.append(("run", settings.name)))
    finished = tmp_path / "runs" / "tpe-0" / "summary"
    finished.mkdir(parents=True)
    (finished / "summary.json").write_text("{}")
    args = argparse.Namespace(space="demo", budget=24, overrides=[], scheduler="asha", population=4)
    for seed in (0, 1):
        efficiency.run(args, Path("/data/dev"), seed, True, tmp_path)
    assert calls == [("read", "tpe-0"), ("run", "tpe-1")]


def test_each_search_is_the_space_with_its_searcher_and_scheduler(efficiency, tmp_path, monkeypatch) -> None:
    spaces = {}
    monkeypatch.setattr(efficiency, "run_search", lambda settings: spaces.update({settings.name: settings.space}))
    asha = argparse.Namespace(space="demo", budget=24, overrides=["epochs=4"], scheduler="asha", population=4)
    pbt = argparse.Namespace(**{**vars(asha), "scheduler": "pbt", "population": 3})
    efficiency.run(asha, Path("/data/dev"), 0, True, tmp_path)
    efficiency.run(asha, Path("/data/dev"), 0, False, tmp_path)
    efficiency.run(pbt, Path("/data/dev"), 0, True, tmp_path)
    tpe, random, population = spaces["tpe-0"], spaces["random-0"], spaces["pbt-0"]
    assert (tpe.searcher.kind, tpe.scheduler.kind, tpe.num_samples) == ("tpe", "asha", 24)
    assert (random.searcher.kind, random.scheduler.kind, random.num_samples) == ("random", "fifo", 24)
    assert (population.scheduler.kind, population.num_samples, population.epochs) == ("pbt", 3, 4)
    assert efficiency.searched_labels(pbt) == ("pbt", "pbt") and efficiency.searched_labels(asha)[0] == "tpe_asha"


def test_a_plot_path_is_refused_before_any_search(efficiency, monkeypatch, capsys) -> None:
    # Seen here: `--plot bench/results/x.png` failed after 40 minutes of searches, when the plot was saved.
    monkeypatch.setattr(sys, "argv", ["search_efficiency.py", "--plot", "bench/results/x.png"])
    with pytest.raises(SystemExit):
        efficiency.main()
    assert "--plot takes a file name" in capsys.readouterr().err
