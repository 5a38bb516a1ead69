"""Which searched settings mattered: Optuna's fANOVA over the trials of a finished search.

Ray Tune has no parameter importance (ray-project/ray#25522). The trials are given to a fresh
Optuna study through its public API (`create_trial` + `add_trial`), so the same works whichever
searcher proposed them; each trial's value is its best score, as in the parameter-effects plot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.importance import FanovaImportanceEvaluator

from prado_dist.search.space import Choice, IntUniform, LogUniform, SearchSpace

FEW_TRIALS = 10  # below this, fANOVA's forest is fitted on too few points to rank more than roughly


@dataclass(frozen=True)
class Importances:
    values: dict[str, float]  # searched setting -> share of the score's variance (sums to 1); {} if none
    note: str  # what they rest on, or why there are none


def parameter_importances(trials: dict[str, dict[str, Any]], space: SearchSpace) -> Importances:
    """fANOVA importances of the searched settings over the trials that produced a score."""
    if not space.params:
        return Importances({}, "nothing was searched")
    if space.scheduler.population_based:
        return Importances({}, "none: a population-based search changes its settings while trials train")
    distributions = {name: distribution(spec) for name, spec in space.params.items()}
    scored = [
        trial
        for trial in trials.values()
        if trial.get("best") is not None
        and all(_within(distributions[k], trial["config"].get(k)) for k in distributions)
    ]
    if len(scored) < 3:
        return Importances({}, f"none: {len(scored)} trial(s) produced a score, too few to compare")
    study = optuna.create_study(direction="maximize" if space.mode == "max" else "minimize")
    for trial in scored:
        params = {name: trial["config"][name] for name in distributions}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=trial["best"]))
    evaluator = FanovaImportanceEvaluator(seed=space.search_seed)
    values = optuna.importance.get_param_importances(study, evaluator=evaluator)
    full = sum(not trial["stopped_early"] for trial in scored)
    note = f"fANOVA over {len(scored)} trials' best {space.metric} ({full} trained all epochs, the rest fewer)"
    if len(scored) < FEW_TRIALS:
        note += f"; with fewer than {FEW_TRIALS} trials, read the ranking as a hint"
    return Importances({name: float(value) for name, value in values.items()}, note)


def distribution(spec) -> BaseDistribution:
    """The Optuna distribution a searched parameter was drawn from."""
    if isinstance(spec, Choice):
        return CategoricalDistribution(tuple(spec.values))
    if isinstance(spec, IntUniform):
        return IntDistribution(int(spec.low), int(spec.high))
    return FloatDistribution(spec.low, spec.high, log=isinstance(spec, LogUniform))


def _within(distribution: BaseDistribution, value: Any) -> bool:
    """A trial of a search resumed with an edited space may hold values outside today's ranges."""
    if isinstance(distribution, CategoricalDistribution):
        return value in distribution.choices
    return isinstance(value, int | float) and distribution.low <= value <= distribution.high
