"""Ray Tune layer: search spaces, Optuna TPE + ASHA over Ray Train trials, MLflow records.

Imports the Ray Train layer (prado_dist.distributed) and below; the CLI (prado_dist.tune) wraps it.
"""

from prado_dist.config import parse_set
from prado_dist.search.preflight import check_search
from prado_dist.search.runner import (
    PreparedSearch,
    SearchError,
    SearchOutcome,
    SearchSettings,
    prepare_search,
    run_search,
)
from prado_dist.search.searcher import PruningAwareOptunaSearch
from prado_dist.search.space import SearchSpace, known_spaces, load_space
from prado_dist.search.tracking import TrackingError, tracking_uri

__all__ = [
    "PreparedSearch",
    "PruningAwareOptunaSearch",
    "SearchError",
    "SearchOutcome",
    "SearchSettings",
    "SearchSpace",
    "TrackingError",
    "check_search",
    "known_spaces",
    "load_space",
    "parse_set",
    "prepare_search",
    "run_search",
    "tracking_uri",
]
