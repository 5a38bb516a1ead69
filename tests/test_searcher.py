"""Early-stopped trials reach Optuna as PRUNED with their intermediate values, not as COMPLETE."""

from __future__ import annotations

from types import SimpleNamespace

import optuna
import pytest
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from prado_dist.search import PruningAwareOptunaSearch

SPACE = {"lr": tune.loguniform(1e-4, 1e-2)}


def run_two_trials(searcher) -> None:
    searcher.set_search_properties("val_balanced_accuracy", "max", SPACE)
    for trial_id, scores in [("full", [0.3, 0.5, 0.7, 0.8]), ("stopped", [0.2, 0.25])]:
        assert searcher.suggest(trial_id) is not None
        for epoch, score in enumerate(scores, start=1):
            result = {"val_balanced_accuracy": score, "epochs_completed": epoch, "training_iteration": epoch}
            searcher.on_trial_result(trial_id, result)
        searcher.on_trial_complete(trial_id, result)


def states(searcher) -> dict[int, optuna.trial.TrialState]:
    return {trial.number: trial.state for trial in searcher._ot_study.trials}


def test_ray_optuna_search_records_early_stopped_trials_as_complete() -> None:
    """The flaw being fixed: Ray's own searcher calls a 2-of-4-epoch trial COMPLETE at 0.25."""
    searcher = OptunaSearch(seed=0)
    run_two_trials(searcher)
    assert states(searcher) == {0: optuna.trial.TrialState.COMPLETE, 1: optuna.trial.TrialState.COMPLETE}


def test_early_stopped_trial_is_pruned_with_intermediate_values() -> None:
    searcher = PruningAwareOptunaSearch(seed=0, max_epochs=4)
    run_two_trials(searcher)
    full, stopped = searcher.study.trials
    assert full.state == optuna.trial.TrialState.COMPLETE and full.value == pytest.approx(0.8)
    assert stopped.state == optuna.trial.TrialState.PRUNED
    assert stopped.intermediate_values == {1: 0.2, 2: 0.25}
    # Optuna takes a pruned trial's value from its last intermediate value.
    assert stopped.value == pytest.approx(0.25)


def test_full_trial_is_told_its_last_epoch_not_its_best() -> None:
    # Its best epoch is a selected, luckier estimate; telling it did not help (searcher.py docstring).
    for mode, scores, told in [("max", [0.3, 0.7, 0.6, 0.5], 0.5), ("min", [0.9, 0.4, 0.6, 0.5], 0.5)]:
        searcher = PruningAwareOptunaSearch(seed=0, max_epochs=4)
        searcher.set_search_properties("val_balanced_accuracy", mode, SPACE)
        searcher.suggest("dipped")
        for epoch, score in enumerate(scores, start=1):
            result = {"val_balanced_accuracy": score, "epochs_completed": epoch}
            searcher.on_trial_result("dipped", result)
        searcher.on_trial_complete("dipped", result)
        (trial,) = searcher.study.trials
        assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == pytest.approx(told)


def test_failed_trial_is_failed_not_pruned() -> None:
    searcher = PruningAwareOptunaSearch(seed=0, max_epochs=4)
    searcher.set_search_properties("val_balanced_accuracy", "max", SPACE)
    searcher.suggest("broken")
    searcher.on_trial_result("broken", {"val_balanced_accuracy": 0.2, "epochs_completed": 1})
    searcher.on_trial_complete("broken", None, error=True)
    assert searcher.study.trials[0].state == optuna.trial.TrialState.FAIL


def test_first_point_is_the_baseline() -> None:
    searcher = PruningAwareOptunaSearch(seed=0, max_epochs=4, points_to_evaluate=[{"lr": 1e-3}])
    searcher.set_search_properties("val_balanced_accuracy", "max", SPACE)
    assert searcher.suggest("first") == {"lr": 1e-3}


def test_epoch_budget_counts_each_trained_epoch_once() -> None:
    from prado_dist.search.tuner import EndsOfBudget, EpochBudget

    budget = EpochBudget(5)
    for epoch in (1, 2, 3):
        assert budget("a", {"epochs_completed": epoch}) is False
    # A trial function that returns normally has its last result reported again (done=True): the
    # random-search baseline then got 20 of its 24 epochs (measured, bench/search_efficiency.py).
    budget("a", {"epochs_completed": 3, "done": True})
    budget("b", {"epochs_completed": 1})
    assert budget.spent == 4 and not budget.stop_all()
    # The epoch that spends the budget stops its trial alone; the search stops when that trial has
    # ended (its last checkpoint registered by Tune), told by the EndsOfBudget callback.
    assert budget("b", {"epochs_completed": 2}) is True
    assert budget.spent == 5 and not budget.stop_all()
    EndsOfBudget().on_trial_complete(0, [], trial=SimpleNamespace(trial_id="b"))
    assert budget.stop_all()


def test_tpe_models_after_the_spaces_startup_trials(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.tune.search import BasicVariantGenerator

    from prado_dist.search import load_space
    from prado_dist.search.tuner import make_searcher, searcher_description

    samplers: list[dict] = []
    tpe = optuna.samplers.TPESampler
    monkeypatch.setattr(optuna.samplers, "TPESampler", lambda **kwargs: samplers.append(kwargs) or tpe(**kwargs))
    space = load_space("demo", {"searcher.startup_trials": 2, "search_seed": 7})
    assert isinstance(make_searcher(space, concurrent=1), PruningAwareOptunaSearch)
    assert samplers == [{"seed": 7, "n_startup_trials": 2}]
    assert searcher_description(space).startswith("Optuna TPE (the first 2")
    # Optuna's default of 10 start-up trials would leave a 6-trial search all random: said, not hidden.
    default = load_space("demo", {"searcher.startup_trials": 10})
    assert "all 6 trials are its random start-up trials" in searcher_description(default)
    # The baselines of bench/search_efficiency.py are settings of the space, as any user may choose them.
    baselines = load_space("demo", {"searcher.kind": "random", "scheduler.kind": "fifo"})
    assert isinstance(make_searcher(baselines, concurrent=1), BasicVariantGenerator)
    assert searcher_description(baselines) == "random search without early stopping"
    with pytest.raises(Exception, match="searcher.kind"):
        load_space("demo", {"searcher.kind": "grid"})
