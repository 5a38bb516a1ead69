"""Ray Tune layer: search spaces, Optuna TPE + ASHA over Ray Train trials, MLflow records.

Imports the Ray Train layer (prado_dist.distributed) and below; the CLI (prado_dist.tune) wraps it.
"""

from prado_dist.search.runner import SearchError, SearchOutcome, SearchSettings, run_search
from prado_dist.search.searcher import PruningAwareOptunaSearch
from prado_dist.search.space import SearchSpace, known_spaces, load_space, parse_set
from prado_dist.search.tracking import TrackingError, tracking_uri

__all__ = [
    "PruningAwareOptunaSearch",
    "SearchError",
    "SearchOutcome",
    "SearchSettings",
    "SearchSpace",
    "TrackingError",
    "known_spaces",
    "load_space",
    "parse_set",
    "run_search",
    "tracking_uri",
]
