"""Search faults on a local two-CPU Ray: more GPUs per worker than the cluster has is refused before
any trial starts (and leaves its --name free), and a diverging trial fails with its reason while the
search finishes with the healthy one. Every test here starts Ray (kept apart from the files whose
tests assert that Ray never started).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from prado_dist.distributed import leftover_resources
from prado_dist.search import SearchSettings, load_space, run_search
from prado_dist.search.storage import STATE_FILE
from tests.conftest import local_ray
from tests.helpers import run_tune, search_args


def alive_actors(class_name: str) -> int:
    from ray._private import state  # the GCS actor table: the State API needs the dashboard

    return sum(a["ActorClassName"] == class_name and a["State"] != "DEAD" for a in state.actors().values())


def wait_for(condition, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


@pytest.fixture(scope="module")
def ray_two_cpus() -> Iterator[str]:
    with local_ray(num_cpus=2) as temp_dir:
        yield temp_dir


@pytest.mark.ray
def test_more_gpus_than_the_cluster_has_is_refused_before_any_trial(
    ray_two_cpus: str, small_demo: Path, tmp_path: Path, mlflow_uri: str, capsys
) -> None:
    started = time.monotonic()
    code, err = run_tune(search_args(small_demo, tmp_path, mlflow_uri, "--gpus-per-worker", "1"), capsys)
    assert code == 2 and time.monotonic() - started < 60
    assert "can never be scheduled" in err and "1 GPUs, but the cluster has 0" in err and "--gpus-per-worker" in err
    (search,) = (tmp_path / "runs").iterdir()
    assert not (search / "tuner.pkl").exists() and not (search / "train").exists()  # no trial started
    assert leftover_resources()["placement_groups"] == []
    client = MlflowClient(tracking_uri=mlflow_uri)
    (parent,) = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    assert parent.info.status == "FAILED" and "GPUs" in parent.data.tags["error"]
    # The failed start leaves its name free: the same --name, fixed, runs (it was refused as existing).
    assert not (search / STATE_FILE).exists()
    assert (
        run_tune(search_args(small_demo, tmp_path, mlflow_uri, "--name", search.name, "--num-samples", "1"), capsys)[0]
        == 0
    )


DIVERGING_SPACE = {
    "model": "mobilenet",
    "fixed": {"epochs": 1, "image_size": 32, "batch_size": 32, "bn_momentum": 0.3},
    # The first trial is the baseline, lr 1e30: the loss is NaN within the first steps.
    "params": {"lr": {"distribution": "choice", "values": [1.0e30, 1.0e-3]}},
    "baseline": {"lr": 1.0e30},
    "trial": {"workers": 1, "cpus_per_worker": 1},
    "num_samples": 2,
    "max_concurrent": 2,
    "search_seed": 3,  # TPE's second suggestion with this seed is lr 1e-3 (checked below)
}


@pytest.mark.ray
@pytest.mark.slow
def test_diverging_trial_fails_with_its_reason_and_the_search_finishes(
    ray_two_cpus: str, small_demo: Path, tmp_path: Path, mlflow_uri: str
) -> None:
    path = tmp_path / "diverging.yaml"
    path.write_text(yaml.safe_dump(DIVERGING_SPACE))
    settings = SearchSettings(
        load_space(path), small_demo, storage=str(tmp_path / "runs"), mlflow_uri=mlflow_uri, experiment="nan",
        trial_failures=0,
    )  # fmt: skip
    outcome = run_search(settings)

    by_lr = {trial["config"]["lr"]: trial for trial in outcome.trials.values()}
    assert set(by_lr) == {1e30, 1e-3}, f"TPE did not propose lr 1e-3 second: {outcome.trials}"
    diverged, healthy = by_lr[1e30], by_lr[1e-3]
    assert diverged["status"] == "error" and "NonFiniteLossError" in diverged["error"]
    assert healthy["status"] == "ok" and healthy["error"] is None and healthy["epochs"] == 1
    assert outcome.best_config["lr"] == 1e-3 and 0.0 <= outcome.test["test_accuracy"] <= 1.0
    summary = json.loads((outcome.path / "summary" / "summary.json").read_text())
    assert sum("NonFiniteLossError" in (t["error"] or "") for t in summary["trials"].values()) == 1
    assert leftover_resources()["placement_groups"] == []
    # Train's detached PlacementGroupCleaners of the Tune-stopped trials do not outlive the search.
    assert wait_for(lambda: alive_actors("PlacementGroupCleaner") == 0), alive_actors("PlacementGroupCleaner")

    client = MlflowClient(tracking_uri=mlflow_uri)
    children = client.search_runs(
        [client.get_experiment_by_name("nan").experiment_id], f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'"
    )
    statuses = sorted((run.info.status, "NonFiniteLossError" in run.data.tags.get("error", "")) for run in children)
    assert statuses == [("FAILED", True), ("FINISHED", False)]
    assert client.get_run(outcome.parent_run_id).info.status == "FINISHED"
