"""End to end on a 2-CPU local Ray: a real search with ASHA stops, MLflow records checked through
the REST API of a real `mlflow server`, the final test evaluation, nothing left reserved; then a
search whose driver is killed is resumed without losing or repeating trials."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from prado_dist.distributed import leftover_resources
from prado_dist.search import SearchError, SearchSettings, load_space, run_search
from prado_dist.search.runner import finished_outcome
from prado_dist.tune import how_to_open
from tests.conftest import local_ray

pytestmark = [pytest.mark.ray, pytest.mark.slow]

DEMO_OVERRIDES = {
    "num_samples": 4,
    "epochs": 3,
    "image_size": 32,
    "scheduler.grace_period": 1,
    "scheduler.reduction_factor": 2,
}


def rest(uri: str, endpoint: str, body: dict | None = None, **query: str) -> dict:
    url = f"{uri}/api/2.0/mlflow/{endpoint}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def tags_of(run: dict) -> dict[str, str]:
    return {tag["key"]: tag["value"] for tag in run["data"].get("tags", [])}


def test_search_on_two_cpus_records_everything_in_mlflow(
    small_demo: Path, mlflow_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    space = load_space("demo", DEMO_OVERRIDES)
    settings = SearchSettings(
        space=space, data_dir=small_demo, storage=str(tmp_path / "runs"), mlflow_uri=mlflow_server, experiment="e2e",
        register_model="prado-demo",
    )  # fmt: skip
    with local_ray(num_cpus=2):  # the laptop case that used to deadlock
        outcome = run_search(settings)
        leftovers = leftover_resources()
        read_back = finished_outcome(settings)  # from storage alone: nothing trains again

    # The search finished every trial, ASHA stopped at least one, and nothing stays reserved.
    assert len(outcome.trials) == 4
    assert all(trial["status"] == "ok" and trial["devices"] == "cpu" for trial in outcome.trials.values())
    stopped = [t for t in outcome.trials.values() if t["stopped_early"]]
    assert 1 <= len(stopped) < 4
    assert leftovers["placement_groups"] == []
    assert leftovers["available"].get("CPU") == pytest.approx(2.0)
    assert read_back.best_trial_id == outcome.best_trial_id and read_back.test == pytest.approx(outcome.test)
    assert {key: trial["curve"] for key, trial in read_back.trials.items()} == {
        key: trial["curve"] for key, trial in outcome.trials.items()
    }
    # The console: a line when each trial starts, one per epoch with the searched metric, one when it
    # ends; no per-class metrics (MLflow has them), no Ray internals such as checkpoint paths.
    console = capsys.readouterr().out
    for trial_id, trial in outcome.trials.items():
        assert f"[{trial_id}] started: lr " in console
        assert console.count(f"[{trial_id}] epoch ") == trial["epochs"]
        ended = "finished" if not trial["stopped_early"] else "stopped early"
        epochs = f"{trial['epochs']} epoch" + ("s" if trial["epochs"] != 1 else "")
        assert f"[{trial_id}] {ended} after {epochs}, best val_balanced_accuracy" in console
    assert "val_recall_" not in console and "Checkpoint successfully created" not in console
    # The report's configuration was evaluated, and the final test evaluation ran once.
    assert outcome.baseline_val is not None
    assert set(outcome.test) >= {"test_accuracy", "test_balanced_accuracy", "test_macro_f1"}
    assert 0.0 <= outcome.test["test_accuracy"] <= 1.0

    experiment_id = rest(mlflow_server, "experiments/get-by-name", experiment_name="e2e")["experiment"]["experiment_id"]
    runs = rest(mlflow_server, "runs/search", {"experiment_ids": [experiment_id], "max_results": 100})["runs"]
    parent = next(run for run in runs if run["info"]["run_id"] == outcome.parent_run_id)
    children = [run for run in runs if tags_of(run).get("mlflow.parentRunId") == outcome.parent_run_id]
    assert len(children) == 4 and len(runs) == 5
    assert parent["info"]["status"] == "FINISHED"
    parent_metrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
    assert parent_metrics["test_accuracy"] == pytest.approx(outcome.test["test_accuracy"])
    assert "best.lr" in {p["key"] for p in parent["data"]["params"]}
    # What mattered: an importance per searched setting (4 trials: said to be a hint), on the parent run.
    assert set(outcome.importances) == set(space.params) and "read the ranking as a hint" in outcome.importance_note
    assert {f"importance.{name}" for name in space.params} <= set(parent_metrics)
    assert tags_of(parent)["importance_note"] == outcome.importance_note
    # The data as the runs table's Dataset column shows it; the best model as a registered version.
    (dataset,) = [item["dataset"] for item in parent["inputs"]["dataset_inputs"]]
    assert dataset["digest"] == tags_of(parent)["dataset_fingerprint"][:16] and dataset["name"] == small_demo.name
    (version,) = rest(mlflow_server, "model-versions/search", filter="name='prado-demo'")["model_versions"]
    assert version["run_id"] == outcome.parent_run_id
    assert {tag["key"]: tag["value"] for tag in version["tags"]}["best_trial_id"] == outcome.best_trial_id

    for child in children:
        tags = tags_of(child)
        assert {"trial_id", "model", "dataset_fingerprint", "git_commit", "stopped_early"} <= set(tags)
        assert tags["devices"] == "cpu"  # where the trial trained: its one worker's device
        assert {p["key"] for p in child["data"]["params"]} >= {"lr", "decay", "pca_std", "flip_prob"}
        history = rest(
            mlflow_server, "metrics/get-history", run_id=child["info"]["run_id"], metric_key="val_balanced_accuracy"
        )["metrics"]
        steps = sorted(point["step"] for point in history)
        epochs = int(tags["epochs_completed"])
        assert steps == list(range(1, epochs + 1))  # one point per epoch, the epoch as step
        assert tags["stopped_early"] == str(epochs < 3).lower()

    artifacts = rest(mlflow_server, "artifacts/list", run_id=outcome.parent_run_id)
    names = {entry["path"] for entry in artifacts.get("files", [])}
    assert {"trial_curves.png", "parameter_effects.png", "parameter_importances.png", "summary.json"} <= names
    assert "test_confusion_matrix.png" in names
    models = rest(mlflow_server, "logged-models/search", {"experiment_ids": [experiment_id]}).get("models", [])
    assert any(m["info"].get("source_run_id") == outcome.parent_run_id for m in models)


def test_placement_groups_whose_creator_died_are_released() -> None:
    # What a Train controller killed with its trial leaves: Ray removes a placement group only when its
    # creator actor *and* job are dead, and one still pending is created after the creator died.
    import ray
    from ray.util import placement_group, placement_group_table

    from prado_dist.search.train_workarounds import _job_placement_groups, release_orphaned_placement_groups

    @ray.remote(num_cpus=0)
    class Controller:
        def reserve(self, cpus: float, wait: bool) -> str:
            group = placement_group([{"CPU": cpus}])
            if wait:
                ray.get(group.ready(), timeout=60)
            return group.id.hex()

    def state(group_id: str) -> str:
        return placement_group_table()[group_id]["state"]

    with local_ray(num_cpus=2):
        doomed, survivor = Controller.remote(), Controller.remote()
        orphan = ray.get(doomed.reserve.remote(0.5, wait=True))
        kept = ray.get(survivor.reserve.remote(0.5, wait=True))
        own = placement_group([{"CPU": 0.5}])  # the driver's, like Tune's trial groups
        ray.get(own.ready(), timeout=60)
        pending = ray.get(doomed.reserve.remote(1.5, wait=False))  # does not fit (yet)
        ray.kill(doomed)
        deadline = time.monotonic() + 30
        while not all(_job_placement_groups()[group] for group in (orphan, pending)):
            assert time.monotonic() < deadline, "the killed creator was never marked dead"
            time.sleep(0.2)
        assert state(orphan) == "CREATED" and state(pending) == "PENDING"  # Ray keeps them

        assert release_orphaned_placement_groups() == 2
        assert (state(orphan), state(pending), state(kept), state(own.id.hex())) == (
            "REMOVED", "REMOVED", "CREATED", "CREATED",
        )  # fmt: skip
        deadline = time.monotonic() + 30  # the raylet returns the bundles' CPUs asynchronously
        while ray.available_resources().get("CPU", 0.0) < 1.0 - 1e-9 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ray.available_resources().get("CPU") == pytest.approx(1.0)  # the orphan's 0.5 is back
        assert release_orphaned_placement_groups() == 0


def test_search_stopped_by_its_epoch_budget_leaves_nothing_for_the_next(
    small_demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The benchmark's path: random search without early stopping, ended mid-flight by the budget while
    # trials are still starting; the next search on the same Ray instance must get the CPUs.
    baselines = {"searcher.kind": "random", "scheduler.kind": "fifo"}
    space = load_space("demo", {**DEMO_OVERRIDES, "num_samples": 6, "epochs": 2, **baselines})
    budget = SearchSettings(
        space=space, data_dir=small_demo, storage=str(tmp_path / "runs"), name="budget",
        mlflow_uri=f"sqlite:///{tmp_path}/mlflow.db", epoch_budget=3,
    )  # fmt: skip
    with local_ray(num_cpus=2):
        stopped = run_search(budget)
        after_stop = leftover_resources()
        # Checked before the next search: with a group left reserved it would wait forever.
        assert after_stop["placement_groups"] == [] and after_stop["available"].get("CPU") == pytest.approx(2.0)
        monkeypatch.chdir(small_demo.parent)  # a relative data folder: trials run in their own folders
        following = SearchSettings(
            space=load_space("demo", {**DEMO_OVERRIDES, "num_samples": 1, "epochs": 1}), data_dir=Path(small_demo.name),
            storage=str(tmp_path / "runs"), name="following", mlflow_uri=f"sqlite:///{tmp_path}/mlflow.db",
        )  # fmt: skip
        second = run_search(following)
        after_second = leftover_resources()
    epochs = sum(trial["epochs"] for trial in stopped.trials.values())
    assert 3 <= epochs < 6 * 2  # stopped by the budget (a running trial may finish its epoch)
    assert [trial["epochs"] for trial in second.trials.values()] == [1]
    assert after_second["placement_groups"] == []


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        (
            "sqlite:////data/searches.db",
            "open with: mlflow ui --backend-store-uri sqlite:////data/searches.db, "
            "then http://127.0.0.1:5000/#/experiments/7?workflowType=machine_learning",
        ),
        ("http://10.0.0.5:5000", "open http://10.0.0.5:5000/#/experiments/7?workflowType=machine_learning"),
    ],
)
def test_summary_says_how_to_open_the_store_it_wrote_to(uri: str, expected: str) -> None:
    assert how_to_open(uri, "7") == expected


def tune_command(storage: Path, db: Path, *extra: str) -> list[str]:
    overrides = [f"--set={key}={value}" for key, value in DEMO_OVERRIDES.items() if key != "num_samples"]
    return [
        sys.executable,
        "-m",
        "prado_dist.tune",
        "--space",
        "demo",
        "--num-samples",
        "4",
        "--max-concurrent",
        "1",
        "--num-cpus",
        "2",
        "--storage",
        str(storage),
        "--name",
        "resumable",
        "--mlflow-uri",
        f"sqlite:///{db}",
        *overrides,
        *extra,
    ]


def finished_children(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db) as connection:
            return connection.execute(
                "select count(*) from runs r join tags t on t.run_uuid = r.run_uuid "
                "where t.key = 'mlflow.parentRunId' and r.status = 'FINISHED'"
            ).fetchone()[0]
    except sqlite3.Error:
        return 0


def kill_session(process: subprocess.Popen, ray_dir: str) -> None:
    """SIGKILL the driver and every Ray process of its private temp dir."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:  # the driver's session has ended already
        pass
    process.wait(timeout=30)
    listing = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    for line in listing.splitlines()[1:]:
        pid, _, args = line.strip().partition(" ")
        if ray_dir in args:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_killed_search_resumes_without_losing_or_repeating_trials(small_demo: Path, tmp_path: Path) -> None:
    storage, db = tmp_path / "runs", tmp_path / "mlflow.db"
    ray_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_dir, "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(
        tune_command(storage, db, "--data", str(small_demo)),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 400
    while finished_children(db) < 2:  # two trials done, the third under way
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the first two trials did not finish in time"
        time.sleep(1)
    kill_session(first, ray_dir)
    done_before = finished_children(db)

    second = subprocess.run(
        tune_command(storage, db, "--data", str(small_demo), "--resume"),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "=== Search finished ===" in second.stdout
    assert f"mlflow ui --backend-store-uri sqlite:///{db}" in second.stdout  # the store it wrote to
    summary = json.loads((storage / "resumable" / "summary" / "summary.json").read_text())
    assert len(summary["trials"]) == 4  # none lost, none added twice
    with sqlite3.connect(db) as connection:
        parents = connection.execute(
            "select count(*) from runs where run_uuid not in (select run_uuid from tags where key='mlflow.parentRunId')"
        ).fetchone()[0]
        # Active runs only: a trial started just before the kill, which Tune's state never held, is deleted.
        trial_runs = connection.execute(
            "select t.value from tags t join runs r on r.run_uuid = t.run_uuid "
            "where t.key = 'trial_id' and r.lifecycle_stage = 'active'"
        ).fetchall()
        logged_epochs = {
            trial_id: {step for (step,) in connection.execute(
                "select distinct m.step from metrics m join tags t on t.run_uuid = m.run_uuid "
                "where t.key = 'trial_id' and t.value = ? and m.key = 'val_balanced_accuracy'", (trial_id,)
            )}
            for trial_id in summary["trials"]
        }  # fmt: skip
    # Every trial's summary curve has all its epochs (Tune's own files restart when a trial is
    # restored; the earlier epochs come from its checkpoint), and MLflow has the same epochs.
    for trial in summary["trials"].values():
        assert [epoch for epoch, _ in trial["curve"]] == list(range(1, trial["epochs"] + 1))
    assert logged_epochs == {
        trial_id: {epoch for epoch, _ in trial["curve"]} for trial_id, trial in summary["trials"].items()
    }
    assert parents == 1  # the parent run was continued, not duplicated
    assert len(trial_runs) == len({value for (value,) in trial_runs}) == 4
    assert done_before >= 2 and finished_children(db) == 4


def test_reading_back_an_unfinished_search_is_refused(small_demo: Path, tmp_path: Path) -> None:
    (tmp_path / "half").mkdir()  # a search stopped before its summary was written
    settings = SearchSettings(space=load_space("demo"), data_dir=small_demo, storage=str(tmp_path), name="half")
    with pytest.raises(SearchError, match="holds no finished search"):
        finished_outcome(settings)


def parent_record(db: Path) -> tuple[str, set[str]]:
    """The search's parent run: its status and the names of its metrics."""
    with sqlite3.connect(db) as connection:
        run_id, status = connection.execute(
            "select run_uuid, status from runs where run_uuid not in "
            "(select run_uuid from tags where key = 'mlflow.parentRunId')"
        ).fetchone()
        metrics = {key for (key,) in connection.execute("select key from metrics where run_uuid = ?", (run_id,))}
    return status, metrics


def test_ctrl_c_leaves_an_untested_killed_search_that_resumes_to_its_end(small_demo: Path, tmp_path: Path) -> None:
    storage, db = tmp_path / "runs", tmp_path / "mlflow.db"
    ray_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_dir, "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        first = subprocess.Popen(
            tune_command(storage, db, "--data", str(small_demo)), env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 400
        while finished_children(db) < 1:  # one trial done, the next under way
            assert first.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the first trial did not finish in time"
            time.sleep(1)
        first.send_signal(signal.SIGINT)  # as Ctrl-C in a terminal: to the driver
        try:
            code = first.wait(timeout=180)
        finally:
            kill_session(first, ray_dir)
    output = log_path.read_text()
    assert code == 130, output[-3000:]
    assert "was interrupted" in output and "--resume --name resumable" in output and "Search finished" not in output
    assert not (storage / "resumable" / "summary").exists()  # nothing tested, nothing summarised
    status, metrics = parent_record(db)
    assert status == "KILLED" and not any(key.startswith("test_") for key in metrics)

    second = subprocess.run(
        tune_command(storage, db, "--data", str(small_demo), "--resume"), env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "=== Search finished ===" in second.stdout
    summary = json.loads((storage / "resumable" / "summary" / "summary.json").read_text())
    assert len(summary["trials"]) == 4 and finished_children(db) == 4
    status, metrics = parent_record(db)
    assert status == "FINISHED" and {"test_accuracy", "test_balanced_accuracy"} <= metrics
