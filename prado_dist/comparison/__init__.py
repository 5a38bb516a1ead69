"""Comparison layer: one search per architecture at an equal budget, and the leaderboard of them.

Above the Ray Tune layer (prado_dist.search), below the CLI (prado_dist.compare). reference.py holds
the report's own figures, measures.py what is measured of each model, leaderboard.py the table and
its plot, runner.py the order of the searches under one MLflow parent run.
"""

from prado_dist.comparison.runner import Comparison, ComparisonSettings, open_comparison, run_comparison

__all__ = ["Comparison", "ComparisonSettings", "open_comparison", "run_comparison"]
