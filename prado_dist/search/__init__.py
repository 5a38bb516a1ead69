"""Ray Tune layer: search spaces, Optuna TPE + ASHA (or PBT) over Tune trials, MLflow records.

Imports the Ray Train layer (prado_dist.distributed) and below; the CLI (prado_dist.tune) wraps it.
settings.py says what a search is asked to do, storage.py where it lives, tuner.py how Tune runs
it, results.py what it found, report.py what it records, runner.py the order of all that.
"""

from prado_dist.config import parse_set, tracking_uri
from prado_dist.search.mlflow_experiment import TrackingError
from prado_dist.search.preflight import check_search
from prado_dist.search.results import SearchOutcome
from prado_dist.search.runner import PreparedSearch, prepare_search, run_prepared, run_search
from prado_dist.search.searcher import PruningAwareOptunaSearch
from prado_dist.search.settings import SearchError, SearchInterrupted, SearchSettings
from prado_dist.search.space import SearchSpace, known_spaces, load_space

__all__ = [
    "PreparedSearch",
    "PruningAwareOptunaSearch",
    "SearchError",
    "SearchInterrupted",
    "SearchOutcome",
    "SearchSettings",
    "SearchSpace",
    "TrackingError",
    "check_search",
    "known_spaces",
    "load_space",
    "parse_set",
    "prepare_search",
    "run_prepared",
    "run_search",
    "tracking_uri",
]
