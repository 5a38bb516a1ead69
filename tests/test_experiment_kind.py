"""The MLflow experiment of a search opens on its training runs (issue 25)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

from prado_dist.search.mlflow_experiment import connect

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_connect_marks_experiment_as_model_training(tmp_path):
    client, experiment_id = connect(f"sqlite:///{tmp_path}/mlflow.db", "paintings")
    tags = client.get_experiment(experiment_id).tags
    assert tags.get("mlflow.experimentKind") == "custom_model_development"


def test_the_page_prado_dist_prints_opens_the_training_runs_in_a_browser(tmp_path):
    # MLflow 3.17's UI opens every experiment on its GenAI overview, tag or not; the page prado_dist
    # prints (tracking.experiment_page) must open the runs table. Needs Debian's chromium.
    if not (shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")):
        pytest.skip("no headless browser here (apt-get install chromium)")
    sys.path.insert(0, str(BENCH))  # the script imports bench/_machine.py as its neighbour
    try:
        spec = importlib.util.spec_from_file_location("mlflow_page", BENCH / "mlflow_page.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    page = module.check_pages(tmp_path)["tagged, prado_dist's page"]
    assert page["title"].startswith("Runs") and page["runs_listed"] and not page["genai_overview"]
