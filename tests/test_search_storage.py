"""Search folders, names and parent runs: a failed start does not hide the search to resume, a
search name is not reused without --resume, and two searches started at once (in the same second,
or creating the same MLflow experiment) get separate folders and parent runs. None of these tests
starts Ray.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient

from prado_dist.search import SearchSettings, load_space, prepare_search
from prado_dist.search import runner as runner_module
from prado_dist.search import storage as storage_module
from prado_dist.search.mlflow_experiment import connect
from prado_dist.search.storage import STATE_FILE, locate
from tests.conftest import free_port
from tests.helpers import run_tune, search_args

# --- search folders and names ----------------------------------------------------------------------


def test_failed_start_does_not_hide_the_search_to_resume(
    small_demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    earlier = tmp_path / "runs" / "demo-20200101-000000"
    earlier.mkdir(parents=True)
    (earlier / "tuner.pkl").write_bytes(b"")  # what makes a folder restorable for Tune
    time.sleep(0.01)
    code, _ = run_tune(search_args(small_demo, tmp_path, f"http://127.0.0.1:{free_port()}"), capsys)
    assert code == 2 and len(list((tmp_path / "runs").iterdir())) == 2  # the failed start's empty folder
    settings = SearchSettings(load_space("demo"), small_demo, storage=str(tmp_path / "runs"), resume=True)
    assert locate(settings).name == earlier.name


def test_reusing_a_search_name_without_resume_is_refused(
    small_demo: Path, tmp_path: Path, mlflow_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    earlier = tmp_path / "runs" / "mine"
    earlier.mkdir(parents=True)
    (earlier / "tuner.pkl").write_bytes(b"")  # an earlier search Tune could restore
    code, err = run_tune(search_args(small_demo, tmp_path, mlflow_uri, "--name", "mine"), capsys)
    assert code == 2
    assert "a search named 'mine' already exists" in err and "--resume" in err
    assert sorted(path.name for path in earlier.iterdir()) == ["tuner.pkl"]  # nothing written into it
    assert not ray.is_initialized()
    # Continuing it is what --resume is for; an empty folder (a start that failed early) is reused.
    assert locate(SearchSettings(load_space("demo"), small_demo, storage=str(tmp_path / "runs"), name="mine",
                                 resume=True)).name == "mine"  # fmt: skip
    (tmp_path / "runs" / "empty").mkdir()
    assert locate(SearchSettings(load_space("demo"), small_demo, storage=str(tmp_path / "runs"),
                                 name="empty")).name == "empty"  # fmt: skip


# --- two searches at once ------------------------------------------------------------------------------


def test_two_searches_in_the_same_second_do_not_share_a_folder_or_parent_run(
    small_demo: Path, tmp_path: Path, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    strftime = time.strftime
    monkeypatch.setattr(
        storage_module.time,
        "strftime",
        lambda fmt, *a: "20250101-120000" if fmt == "%Y%m%d-%H%M%S" else strftime(fmt, *a),
    )
    space = load_space("demo", {"epochs": 1, "image_size": 32})
    settings = SearchSettings(
        space, small_demo, storage=str(tmp_path / "runs"), mlflow_uri=mlflow_uri, experiment="two"
    )
    first, second = prepare_search(settings), prepare_search(settings)
    assert (first.location.name, second.location.name) == ("demo-20250101-120000", "demo-20250101-120000-2")
    parents = [runner_module.open_parent_run(prepared) for prepared in (first, second)]
    assert parents[0] != parents[1] and first.experiment_id == second.experiment_id
    for prepared, parent in zip((first, second), parents, strict=True):
        assert json.loads((prepared.location.local / STATE_FILE).read_text())["parent_run_id"] == parent


def test_experiment_created_by_another_search_meanwhile_is_used(mlflow_uri: str, monkeypatch) -> None:
    lookups = []
    original = MlflowClient.get_experiment_by_name

    def racing_lookup(self, name):
        lookups.append(name)
        if len(lookups) == 1:  # the other search creates it right after our first lookup
            MlflowClient(tracking_uri=mlflow_uri).create_experiment(name)
            return None
        return original(self, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", racing_lookup)
    client, experiment_id = connect(mlflow_uri, "raced")
    assert client.get_experiment(experiment_id).name == "raced" and len(lookups) == 2


def test_a_relative_sqlite_store_from_another_folder_is_another_store(tmp_path: Path, monkeypatch) -> None:
    from prado_dist.search.storage import search_identity

    space = load_space("demo")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    started = search_identity(SearchSettings(space=space, data_dir=None, mlflow_uri="sqlite:///mlflow.db"))
    assert started["mlflow_uri"] == f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path / "b")
    elsewhere = search_identity(SearchSettings(space=space, data_dir=None, mlflow_uri="sqlite:///mlflow.db"))
    same = search_identity(SearchSettings(space=space, data_dir=None, mlflow_uri=f"sqlite:///{tmp_path}/a/mlflow.db"))
    assert elsewhere["mlflow_uri"] != started["mlflow_uri"] and same["mlflow_uri"] == started["mlflow_uri"]
