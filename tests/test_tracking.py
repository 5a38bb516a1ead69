"""MLflow going away mid-search loses no data: the search tracker keeps the records it could not
write and writes them, in order, once MLflow is back; a half-written run is completed; what never
gets written is listed in a file; a killed driver's missing records are repaired from Tune's
results on resume. Runs against a local sqlite store through a client that can be made to fail,
without Ray.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.tracking import MlflowClient

from prado_dist.search import tracking as tracking_module
from prado_dist.search.mlflow_experiment import connect
from prado_dist.search.tracking import EndedTrial, SearchTracker


class FlakyClient:
    """An MlflowClient whose calls raise ConnectionError while `down` (or for the methods in `failing`)."""

    def __init__(self, client: MlflowClient) -> None:
        self.client = client
        self.down = False
        self.failing: set[str] = set()
        self.refusing: set[str] = set()  # methods MLflow answers with a permanent refusal
        self.calls: list[tuple[str, tuple, dict]] = []  # the calls that went through, in order
        self.attempts = 0

    def __getattr__(self, name: str):
        method = getattr(self.client, name)
        if not callable(method):
            return method

        def call(*args, **kwargs):
            self.attempts += 1
            if name in self.refusing:
                raise MlflowException(f"refused ({name})", error_code=INVALID_PARAMETER_VALUE)
            if self.down or name in self.failing:
                raise ConnectionError(f"connection refused ({name})")
            result = method(*args, **kwargs)
            self.calls.append((name, args, kwargs))
            return result

        return call


def flaky_tracker(tmp_path: Path, uri: str, experiment: str) -> tuple[SearchTracker, FlakyClient, MlflowClient, str]:
    client, experiment_id = connect(uri, experiment)
    parent = client.create_run(experiment_id).info.run_id
    tracker = SearchTracker(
        uri, experiment_id, parent, {"model": "mobilenet"}, max_epochs=2, pending_file=tmp_path / "mlflow_pending.jsonl"
    )
    tracker.client = FlakyClient(tracker.client)
    return tracker, tracker.client, client, parent


def trial(trial_id: str) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config={"lr": 0.001, "decay": 0.05})


def result(epoch: int) -> dict:
    return {"epochs_completed": epoch, "val_balanced_accuracy": 0.25 * epoch, "timestamp": 1.7e9 + epoch}


def write_order(calls: list[tuple[str, tuple, dict]], run_of: dict[str, str]) -> list[str]:
    """The successful writes as readable events: `create t2`, `t1 epoch 2`, `end t1`."""
    trial_of = {run: trial_id for trial_id, run in run_of.items()}
    events = []
    for name, args, kwargs in calls:
        if name == "create_run":
            events.append(f"create {kwargs['tags']['trial_id']}")
        elif name == "log_batch" and kwargs.get("metrics"):
            events.append(f"{trial_of[args[0]]} epoch {kwargs['metrics'][0].step}")
        elif name == "set_terminated":
            events.append(f"end {trial_of[args[0]]}")
    return events


def test_mlflow_outage_mid_search_loses_nothing(
    tmp_path: Path, mlflow_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    tracker, flaky, client, parent = flaky_tracker(tmp_path, mlflow_uri, "outage")
    t1, t2 = trial("t1"), trial("t2")
    with caplog.at_level(logging.WARNING, logger="prado_dist.search.tracking"):
        tracker.on_trial_start(0, [], t1)
        tracker.on_trial_result(1, [], t1, result(1))
        flaky.down = True  # the server goes away; training goes on
        before = len(flaky.calls)
        tracker.on_trial_result(2, [], t1, result(2))
        tracker.on_trial_start(2, [], t2)
        tracker.on_trial_result(2, [], t2, result(1))
        tracker.on_trial_complete(3, [], t1)
        assert len(flaky.calls) == before and len(tracker.records.pending) == 4
        flaky.down = False  # back: the next record first writes everything that waited, in order
        tracker.on_trial_result(3, [], t2, result(2))
        tracker.on_trial_complete(4, [], t2)
    assert tracker.records.pending == [] and tracker.records.close() == []
    assert not (tmp_path / "mlflow_pending.jsonl").exists()
    messages = [record.getMessage() for record in caplog.records]
    assert sum("MLflow unreachable" in m for m in messages) == 1  # one warning per outage, not per record
    assert "records are kept and retried" in next(m for m in messages if "MLflow unreachable" in m)
    assert any("reachable again: all delayed records written" in m for m in messages)

    assert write_order(flaky.calls[before:], tracker.child_runs) == [
        "t1 epoch 2", "create t2", "t2 epoch 1", "end t1", "t2 epoch 2", "end t2",
    ]  # fmt: skip
    children = client.search_runs([tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(run.data.tags["trial_id"] for run in children) == ["t1", "t2"]
    for run in children:
        history = client.get_metric_history(run.info.run_id, "val_balanced_accuracy")
        assert [(m.step, m.value) for m in history] == [(1, 0.25), (2, 0.5)]
        assert run.data.params == {"lr": "0.001", "decay": "0.05"}
        assert run.info.status == "FINISHED" and run.data.tags["stopped_early"] == "false"


def test_run_created_but_params_lost_is_completed_on_retry(tmp_path: Path, mlflow_uri: str) -> None:
    tracker, flaky, client, parent = flaky_tracker(tmp_path, mlflow_uri, "half-written")
    flaky.failing = {"log_batch"}  # create_run goes through, the params do not
    tracker.on_trial_start(0, [], trial("t1"))
    flaky.failing = set()
    tracker.on_trial_result(1, [], trial("t1"), result(1))
    runs = client.search_runs([tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(runs) == 1  # found again by its tag, not created twice
    assert runs[0].data.params == {"lr": "0.001", "decay": "0.05"}
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_balanced_accuracy")] == [1]


def test_mlflow_that_never_returns_lists_exactly_what_is_missing(
    tmp_path: Path, mlflow_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    tracker, flaky, _, _ = flaky_tracker(tmp_path, mlflow_uri, "gone")
    tracker.on_trial_start(0, [], trial("t1"))
    tracker.on_trial_result(1, [], trial("t1"), result(1))
    flaky.down = True
    tracker.on_trial_result(2, [], trial("t1"), result(2))
    tracker.on_trial_complete(3, [], trial("t1"))
    tracker.on_trial_start(3, [], trial("t2"))
    tracker.on_experiment_end([])
    with caplog.at_level(logging.WARNING, logger="prado_dist.search.tracking"):
        missing = tracker.records.close()
    expected = ["epoch 2 metrics of trial t1", "end of trial t1 (FINISHED)", "child run of trial t2"]
    assert missing == expected
    pending = tmp_path / "mlflow_pending.jsonl"
    assert [json.loads(line)["record"] for line in pending.read_text().splitlines()] == expected
    assert any(f"3 MLflow records could not be written; listed in {pending}" in r.getMessage() for r in caplog.records)
    assert tracker.records.close() == []  # listed once

    # A resumed search whose MLflow is still gone adds to the list instead of replacing it.
    resumed, flaky_again, _, _ = flaky_tracker(tmp_path, mlflow_uri, "gone")
    flaky_again.down = True
    resumed.on_trial_start(0, [], trial("t3"))
    resumed.records.close()
    assert len(pending.read_text().splitlines()) == 4


def test_records_a_killed_driver_never_wrote_are_repaired_from_tune_results(tmp_path: Path, mlflow_uri: str) -> None:
    tracker, flaky, client, parent = flaky_tracker(tmp_path, mlflow_uri, "killed")
    tracker.on_trial_start(0, [], trial("t1"))
    tracker.on_trial_result(1, [], trial("t1"), result(1))
    flaky.down = True
    tracker.on_trial_result(2, [], trial("t1"), result(2))  # held in memory when the driver is SIGKILLed
    # The resumed driver: a new tracker, MLflow back; t1 finished while the driver was gone, t2 ran only
    # after the resume and failed, t3 was never seen by MLflow at all.
    resumed, _, _, _ = flaky_tracker(tmp_path, mlflow_uri, "killed")
    resumed.parent_run_id = parent
    ended = [
        EndedTrial("t1", trial("t1").config, [result(1), result(2)]),
        EndedTrial("t2", trial("t2").config, [result(1)], error="NonFiniteLossError: training loss became nan"),
        EndedTrial("t3", trial("t3").config, [result(1), result(2)]),
    ]
    assert [resumed.reconcile(t, "val_balanced_accuracy") for t in ended] == [1, 1, 2]
    assert [resumed.reconcile(t, "val_balanced_accuracy") for t in ended] == [0, 0, 0]  # nothing twice

    children = {
        run.data.tags["trial_id"]: run
        for run in client.search_runs([tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    }
    assert sorted(children) == ["t1", "t2", "t3"]
    for trial_id, run in children.items():
        history = client.get_metric_history(run.info.run_id, "val_balanced_accuracy")
        assert [(m.step, m.value) for m in history] == [(1, 0.25), (2, 0.5)][: len(ended[int(trial_id[1]) - 1].rows)]
        assert run.data.params == {"lr": "0.001", "decay": "0.05"}
    assert children["t1"].info.status == "FINISHED" and children["t1"].data.tags["stopped_early"] == "false"
    assert children["t2"].info.status == "FAILED" and "became nan" in children["t2"].data.tags["error"]
    assert children["t2"].data.tags["epochs_completed"] == "1"


def test_a_permanent_refusal_is_named_and_skipped_without_holding_back_later_records(
    tmp_path: Path, mlflow_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    tracker, flaky, client, _ = flaky_tracker(tmp_path, mlflow_uri, "refusal")
    tracker.on_trial_start(0, [], trial("t1"))
    flaky.refusing = {"log_batch"}  # e.g. a param value MLflow will never accept
    with caplog.at_level(logging.WARNING, logger="prado_dist.search.tracking"):
        tracker.on_trial_result(1, [], trial("t1"), result(1))
    flaky.refusing = set()
    tracker.on_trial_result(2, [], trial("t1"), result(2))
    tracker.on_trial_complete(3, [], trial("t1"))
    assert tracker.records.pending == [] and tracker.records.close() == []
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1 and "epoch 1 metrics of trial t1" in refusals[0]
    listed = [json.loads(line) for line in (tmp_path / "mlflow_pending.jsonl").read_text().splitlines()]
    assert [entry["record"] for entry in listed] == ["epoch 1 metrics of trial t1"] and "refused" in listed[0]
    run_id = tracker.child_runs["t1"]
    assert [m.step for m in client.get_metric_history(run_id, "val_balanced_accuracy")] == [2]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_hung_server_is_not_asked_again_at_every_event_and_the_queue_is_bounded(
    tmp_path: Path, mlflow_uri: str, monkeypatch
) -> None:
    tracker, flaky, _, _ = flaky_tracker(tmp_path, mlflow_uri, "hung")
    monkeypatch.setattr(tracking_module, "SLOW_FAILURE_S", 0.0)  # every failure counts as a hung server's
    monkeypatch.setattr(tracking_module, "MAX_PENDING", 3)
    tracker.on_trial_start(0, [], trial("t1"))
    flaky.down = True
    tracker.on_trial_result(1, [], trial("t1"), result(1))  # tried once: hung
    tried = flaky.attempts
    for epoch in range(2, 6):
        tracker.on_trial_result(epoch, [], trial("t1"), result(epoch))
    assert flaky.attempts == tried  # no new try within RETRY_AFTER_SLOW_S
    assert [description for description, _ in tracker.records.pending] == [
        f"epoch {epoch} metrics of trial t1" for epoch in (1, 2, 3)
    ]  # at most MAX_PENDING kept; the later ones listed at once
    listed = [json.loads(line)["record"] for line in (tmp_path / "mlflow_pending.jsonl").read_text().splitlines()]
    assert listed == ["epoch 4 metrics of trial t1", "epoch 5 metrics of trial t1"]
    flaky.down = False
    tracker.records._retry_at = 0.0  # the wait is over
    tracker.on_trial_complete(6, [], trial("t1"))
    assert tracker.records.pending == [] and flaky.attempts > tried


def test_the_search_data_is_an_mlflow_dataset_input_with_its_class_counts(small_demo: Path, tmp_path: Path) -> None:
    from prado_dist.data import prepare_data, split_counts
    from prado_dist.search.mlflow_experiment import dataset_input

    data = prepare_data(small_demo, 32, cache_dir=tmp_path / "cache")
    client, experiment_id = connect(f"sqlite:///{tmp_path}/m.db", "inputs")
    run_id = client.create_run(experiment_id).info.run_id
    client.log_inputs(run_id, [dataset_input(data, small_demo)])
    (logged,) = client.get_run(run_id).inputs.dataset_inputs
    assert logged.dataset.digest == data.fingerprint[:16] and logged.dataset.name == small_demo.name
    assert json.loads(logged.dataset.source)["uri"] == str(small_demo.resolve())
    profile = json.loads(logged.dataset.profile)
    assert profile["num_images"] == len(data.labels) == sum(sum(counts) for counts in split_counts(data).values())
    assert profile["test_per_class"] == split_counts(data)["test"]
    assert [(tag.key, tag.value) for tag in logged.tags] == [("mlflow.data.context", "train/validation/test")]
