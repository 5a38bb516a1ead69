"""What a search is asked to do, and the errors that end one with a message instead of a traceback."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ray import tune

from prado_dist.search.space import SearchSpace


class SearchError(RuntimeError):
    """A search that cannot start or resume; the message says why and what to do."""


class SearchInterrupted(SearchError):
    """A search stopped before its end (Ctrl-C): nothing was tested, and it can be resumed."""


@dataclass
class SearchSettings:
    space: SearchSpace
    data_dir: Path | None  # None: the generated demo set, built on each machine that needs it
    storage: str = "runs"
    name: str | None = None  # default: <space>-<time>; with resume: the newest <space>-* run
    resume: bool = False
    mlflow_uri: str = "sqlite:///mlflow.db"
    experiment: str | None = None  # default: the space name
    register_model: str | None = None  # a Model Registry name: the best model becomes a new version of it
    parent_run_id: str | None = None  # an MLflow run to nest the search's parent run under (a comparison)
    trial_failures: int = 2  # each trial restarts from its checkpoint up to this many times
    epoch_budget: int | None = None  # stop the search once its trials have trained this many epochs
    verbose: bool = False  # Tune's tables and result boxes, and the libraries' INFO logs
    callbacks: list[tune.Callback] = field(default_factory=list)  # more Tune callbacks (benches, tests)
