"""Hardening: a bad input is refused with what was wrong and what is accepted, before Ray (or a
decode, or MLflow) is spent on it; a fault during a search (MLflow outage, full disk, a diverging
trial, a second search in the same storage) loses no data.

What other files already cover is not repeated here: space validation (test_search_space.py),
finder errors (test_data_sources.py), corrupt images and `decode_image` on a bomb
(test_data_cache.py), truncated or foreign checkpoints (test_engine.py), kill-and-resume
(test_search.py). Everything except the last two tests runs in this process without Ray.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import ray
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from prado_dist.data import cache as cache_module
from prado_dist.data.__main__ import main as data_main
from prado_dist.data.dataset import prepare_data
from prado_dist.data.sources import DataError
from prado_dist.distributed import leftover_resources
from prado_dist.engine import checkpoint as checkpoint_module
from prado_dist.engine.checkpoint import load_checkpoint, save_checkpoint
from prado_dist.search import SearchSettings, load_space, prepare_search, run_search
from prado_dist.search import runner as runner_module
from prado_dist.search import storage as storage_module
from prado_dist.search.storage import STATE_FILE, locate
from prado_dist.search.tracking import EndedTrial, SearchTracker, connect
from prado_dist.train import main as train_main
from prado_dist.tune import main as tune_main
from tests.conftest import free_port, local_ray

SIZE = 16


# --- helpers -------------------------------------------------------------------------------------


def noise_image(path: Path, size: tuple[int, int], seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def two_painters(root: Path, per_class: int = 4) -> Path:
    for label, painter in enumerate(("bosch", "greco")):
        for index in range(per_class):
            noise_image(root / painter / f"{index}.png", (20 + index, 14), seed=10 * label + index)
    return root


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite store for the module: creating its tables costs seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


def run_tune(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = tune_main(argv)
    return code, capsys.readouterr().err


def search_args(data: Path, tmp_path: Path, mlflow_uri: str, *extra: str) -> list[str]:
    return [
        "--space", "demo", "--data", str(data), "--storage", str(tmp_path / "runs"), "--mlflow-uri", mlflow_uri,
        "--set", "image_size=32", "--set", "epochs=1", *extra,
    ]  # fmt: skip


# --- the search CLI: refused before Ray starts ------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--space", "no_such_space"], ["unknown search space 'no_such_space'", "known spaces", "demo"]),
        (["--space", "demo", "--set", "model=alexnet"], ["unknown model 'alexnet'", "known models", "resnet29"]),
        (["--space", "demo", "--set", "epochs=0"], ["epochs", "greater than or equal to 1", "(got 0)"]),
        (["--space", "demo", "--set", "batch_size=-1"], ["batch_size", "greater than or equal to 1", "(got -1)"]),
        (["--space", "demo", "--set", "lr=fast"], ["lr", "valid number", "'fast'"]),
        (["--space", "demo", "--set", "colour=red"], ["--set colour: unknown setting", "training setting"]),
        (["--space", "demo", "--set", "epochs"], ["--set expects key=value", "'epochs'"]),
        (["--space", "demo", "--workers-per-trial", "0"], ["trial.workers", "greater than or equal to 1"]),
        (["--space", "demo", "--cpus-per-worker", "0"], ["trial.cpus_per_worker", "greater than 0"]),
        (["--space", "demo", "--gpus-per-worker", "-1"], ["trial.gpus_per_worker", "greater than or equal to 0"]),
        (["--space", "demo", "--num-samples", "0"], ["num_samples", "greater than or equal to 1"]),
        (["--space", "demo", "--max-concurrent", "0"], ["max_concurrent", "greater than or equal to 1"]),
    ],
    ids=[
        "unknown-space", "unknown-model", "epochs-0", "batch-negative", "lr-not-a-number", "unknown-key",
        "set-without-value", "workers-0", "cpus-0", "gpus-negative", "num-samples-0", "max-concurrent-0",
    ],
)  # fmt: skip
def test_bad_search_settings_exit_2_before_ray(
    argv: list[str], expected: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_tune(argv, capsys)
    assert code == 2 and err.startswith("error: ")
    for text in expected:
        assert text in err
    # The whole space dict used to follow a whole-space check's message ("(got {'model': ...})").
    assert "(got {" not in err and "Value error" not in err
    assert not ray.is_initialized()


def kaggle_csv(root: Path, header: str, line: str) -> Path:
    root.mkdir(parents=True)
    (root / "prado.csv").write_text(f"{header}\n{line}\n", encoding="utf-8")
    noise_image(root / "images" / "a.jpg", (8, 8), seed=0)
    return root


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda root: root, ["does not exist"]),
        (lambda root: root.mkdir() or root, ["is empty", "prado.csv", "one subfolder of images per class"]),
        (
            lambda root: kaggle_csv(root, "author,title", "Goya y Lucientes; Francisco de,x"),
            ["lacks the column(s) ['work_image_url']", "expected the Kaggle prado.csv"],
        ),
        (
            lambda root: kaggle_csv(root, "author,work_image_url", "Velázquez,https://x/a.jpg"),
            ["none of the five painters", "Goya y Lucientes, Francisco de"],
        ),
    ],
    ids=["missing", "empty-folder", "csv-without-columns", "csv-without-painters"],
)
def test_bad_data_folder_exits_2_before_ray(
    make, expected: list[str], tmp_path: Path, mlflow_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make(tmp_path / "data")
    code, err = run_tune(search_args(data, tmp_path, mlflow_uri), capsys)
    assert code == 2
    assert str(data) in err or "prado.csv" in err
    for text in expected:
        assert text in err
    assert not ray.is_initialized()


def test_unwritable_storage_exits_2(small_demo: Path, tmp_path: Path, mlflow_uri: str, capsys) -> None:
    # Tests run as root, which chmod does not stop: a path below a regular file cannot be created.
    (tmp_path / "file.txt").write_text("not a folder")
    argv = search_args(small_demo, tmp_path, mlflow_uri)
    argv[argv.index("--storage") + 1] = str(tmp_path / "file.txt" / "sub")
    code, err = run_tune(argv, capsys)
    assert code == 2
    assert "file.txt/sub" in err and "not writable" in err and "pass a writable --storage" in err
    assert not ray.is_initialized()


def hung_server() -> socket.socket:
    """A port that accepts connections and never answers (a hung server, not a refused port)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    return server


@pytest.mark.parametrize("kind", ["refused", "hung", "bad-scheme"])
def test_unreachable_mlflow_fails_fast_naming_the_uri(
    kind: str, small_demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = hung_server() if kind == "hung" else None
    uri = {
        "refused": f"http://127.0.0.1:{free_port()}",
        "hung": f"http://127.0.0.1:{server.getsockname()[1] if server else 0}",
        "bad-scheme": "mlfow://127.0.0.1:5000",
    }[kind]
    started = time.monotonic()
    try:
        code, err = run_tune(search_args(small_demo, tmp_path, uri), capsys)
    finally:
        if server is not None:
            server.close()
    # Measured: refused and bad scheme at once; hung 20 s (MLFLOW_HTTP_REQUEST_TIMEOUT 10 s, 1 retry).
    assert time.monotonic() - started < 30
    assert code == 2
    assert f"cannot use the MLflow tracking server at {uri!r}" in err and "--mlflow-uri" in err
    assert not ray.is_initialized()


def test_unreachable_ray_address_fails_fast(small_demo: Path, tmp_path: Path, mlflow_uri: str, capsys) -> None:
    # ray.init(address=...) alone kept retrying the GCS for more than 4 minutes (measured).
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    code, err = run_tune(search_args(small_demo, tmp_path, mlflow_uri, "--address", address), capsys)
    assert time.monotonic() - started < 60  # mostly the data and MLflow checks that come first
    assert code == 2
    assert f"cannot connect to the Ray cluster at {address!r}" in err and "ray start --head" in err
    assert not ray.is_initialized()


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


# --- the train CLI ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--model", "alexnet"], ["--model: unknown model 'alexnet'", "known models", "resnet29"]),
        (["--epochs", "0"], ["epochs", "greater than or equal to 1"]),
        (["--workers", "0"], ["workers must be >= 1, got 0"]),
        (["--data", "{tmp}/nowhere"], ["does not exist"]),
    ],
    ids=["unknown-model", "epochs-0", "workers-0", "missing-data"],
)
def test_bad_train_settings_exit_2_before_decoding(
    argv: list[str], expected: list[str], small_demo: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    decoded: list[Path] = []
    monkeypatch.setattr(cache_module, "decode_image", lambda path, size: decoded.append(path))
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    data = [] if "--data" in argv else ["--data", str(small_demo)]
    code = train_main([*argv, *data, "--image-size", "40", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ")
    for text in expected:
        assert text in err
    assert decoded == [] and not (tmp_path / "out").exists()
    assert not ray.is_initialized()


# --- data: duplicates, bombs, a full disk ------------------------------------------------------------


def test_identical_files_are_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys) -> None:
    data = two_painters(tmp_path / "data")
    shutil.copy(data / "bosch" / "1.png", data / "greco" / "copy-of-bosch-1.png")  # one picture, two labels
    shutil.copy(data / "greco" / "2.png", data / "greco" / "2-again.png")  # same class: a split leak
    with caplog.at_level(logging.WARNING, logger=cache_module.__name__):
        prepared = prepare_data(data, SIZE, cache_dir=tmp_path / "cache")
    groups = sorted(sorted((s.path.name, prepared.classes[s.label]) for s in group) for group in prepared.duplicates)
    assert groups == [
        [("1.png", "bosch"), ("copy-of-bosch-1.png", "greco")],
        [("2-again.png", "greco"), ("2.png", "greco")],
    ]
    warning = "\n".join(record.getMessage() for record in caplog.records)
    assert "2 group(s) of files with identical contents (1 under different classes)" in warning
    assert "copy-of-bosch-1.png (greco)" in warning and "[different classes]" in warning

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=cache_module.__name__):
        again = prepare_data(data, SIZE, cache_dir=tmp_path / "cache")  # cached: listed, not warned again
    assert len(again.duplicates) == 2 and not caplog.records

    args = ["inspect", "--data", str(data), "--image-size", str(SIZE), "--cache-dir", str(tmp_path / "cache")]
    assert data_main(args) == 0
    output = capsys.readouterr().out
    assert "identical contents" in output and f"{data / 'greco' / 'copy-of-bosch-1.png'} (greco)" in output

    clean = two_painters(tmp_path / "clean")
    assert prepare_data(clean, SIZE, cache_dir=tmp_path / "cache").duplicates == []


def test_decompression_bomb_is_left_out_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = two_painters(tmp_path / "data")
    noise_image(data / "bosch" / "huge.png", (120, 100), seed=99)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # 12,000 px > 2 x limit: Pillow refuses to open it
    prepared = prepare_data(data, SIZE, cache_dir=tmp_path / "cache")
    assert [(path.name, "MAX_IMAGE_PIXELS (5000)" in reason) for path, reason in prepared.rejected] == [
        ("huge.png", True)
    ]
    assert len(prepared.labels) == 8


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["reserve-images", "write-metadata", "cache-dir-is-a-file"])
def test_full_disk_while_building_the_cache(where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, cache_dir = two_painters(tmp_path / "data"), tmp_path / "cache"
    earlier = prepare_data(data, 24, cache_dir=cache_dir)  # an earlier cache in the same folder
    earlier_pixels = np.array(earlier.images)
    if where == "reserve-images":
        monkeypatch.setattr(cache_module.os, "posix_fallocate", enospc)
    elif where == "write-metadata":  # after every image was decoded and written
        original = Path.write_text
        monkeypatch.setattr(
            Path, "write_text", lambda self, *a, **k: enospc() if self.name == "meta.json" else original(self, *a, **k)
        )
    else:
        cache_dir = tmp_path / "file.txt"
        cache_dir.write_text("not a folder")
    with pytest.raises(DataError) as raised:
        prepare_data(data, SIZE, cache_dir=cache_dir / "sub" if where == "cache-dir-is-a-file" else cache_dir)
    message = str(raised.value)
    assert "cannot write the decoded-image cache in" in message and "PRADO_DIST_CACHE" in message
    if where == "cache-dir-is-a-file":
        return
    assert "No space left on device" in message
    # Nothing half-written stays behind, and the earlier cache is untouched and still used.
    assert sorted(path.name for path in cache_dir.iterdir() if not path.name.endswith(".lock")) == [earlier.fingerprint]
    np.testing.assert_array_equal(prepare_data(data, 24, cache_dir=cache_dir).images, earlier_pixels)
    monkeypatch.undo()
    assert prepare_data(data, SIZE, cache_dir=cache_dir).images.shape == (8, SIZE, SIZE, 3)


def test_full_disk_while_saving_a_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ckpt" / "checkpoint.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "epoch": 1, "config": "{}"})

    def half_then_enospc(payload, file) -> None:
        file.write(b"PK\x03\x04" + b"\0" * 4096)  # the start of a zip, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", half_then_enospc)
    with pytest.raises(OSError) as raised:
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "epoch": 2, "config": "{}"})
    assert raised.value.errno == errno.ENOSPC
    assert str(path) in str(raised.value) and "previous one is unchanged" in str(raised.value)
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]  # no temporary file left


# --- MLflow going away mid-search ----------------------------------------------------------------------


class FlakyClient:
    """An MlflowClient whose calls raise ConnectionError while `down` (or for the methods in `failing`)."""

    def __init__(self, client: MlflowClient) -> None:
        self.client = client
        self.down = False
        self.failing: set[str] = set()
        self.calls: list[tuple[str, tuple, dict]] = []  # the calls that went through, in order

    def __getattr__(self, name: str):
        method = getattr(self.client, name)
        if not callable(method):
            return method

        def call(*args, **kwargs):
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


# --- on a local Ray (last: the tests above assert that Ray never started) ------------------------------


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
