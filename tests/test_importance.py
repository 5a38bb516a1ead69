"""Parameter importances (issue 25): fANOVA over a search's trials, with what they rest on."""

from __future__ import annotations

import random
from pathlib import Path

from prado_dist.search import load_space
from prado_dist.search.importance import parameter_importances
from prado_dist.search.plots import plot_importances


def trials_where_only_lr_matters(count: int, seed: int = 0) -> dict[str, dict]:
    draw = random.Random(seed)
    trials = {}
    for index in range(count):
        config = {
            "lr": 10 ** draw.uniform(-3.5, -2),
            "decay": draw.uniform(0, 0.3),
            "decay_start": draw.randint(0, 10),
            "pca_std": draw.uniform(0, 0.3),
            "flip_prob": draw.choice([0.0, 0.5]),
        }
        best = 0.2 + 0.6 * (config["lr"] > 10**-2.75)  # the score is a step in lr alone
        trials[f"t{index}"] = {"config": config, "best": best, "stopped_early": index % 2 == 1}
    return trials


def test_the_setting_that_decides_the_score_ranks_first(tmp_path: Path) -> None:
    space = load_space("demo")
    importances = parameter_importances(trials_where_only_lr_matters(24), space)
    ranked = sorted(importances.values, key=importances.values.get, reverse=True)
    assert ranked[0] == "lr" and importances.values["lr"] > 0.5
    assert set(importances.values) == set(space.params) and abs(sum(importances.values.values()) - 1) < 1e-6
    assert "24 trials" in importances.note and "12 trained all epochs" in importances.note
    assert plot_importances(importances.values, importances.note, tmp_path / "importances.png").stat().st_size > 0


def test_few_or_unusable_trials_say_so_instead_of_ranking() -> None:
    space = load_space("demo")
    few = parameter_importances(trials_where_only_lr_matters(5), space)
    assert few.values and "read the ranking as a hint" in few.note
    failed = {name: {**trial, "best": None} for name, trial in trials_where_only_lr_matters(6).items()}
    assert parameter_importances(failed, space).values == {}
    assert "0 trial(s) produced a score" in parameter_importances(failed, space).note
    # Values outside today's ranges (a search resumed with an edited space) are left out, not crashed on.
    outside = trials_where_only_lr_matters(4)
    outside["t0"]["config"]["flip_prob"] = 0.25
    assert "over 3 trials" in parameter_importances(outside, space).note
    assert "too few" in parameter_importances(dict(list(outside.items())[:3]), space).note
    population = load_space("demo", {"scheduler.kind": "pbt"})
    assert "population-based" in parameter_importances(trials_where_only_lr_matters(12), population).note
