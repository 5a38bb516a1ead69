"""The Ray Train layer end to end on a local Ray cluster (4 logical CPUs) with tiny 32 px images.

* 2 data-parallel workers compute what one process computes with the same global batch and seed;
* a training worker killed with SIGKILL is replaced, training resumes from the latest checkpoint and
  every epoch appears exactly once;
* a resumed run (engine, and Ray re-run under the same name) continues the learning-rate schedule and
  ends with the weights of an uninterrupted run;
* requests the cluster can never schedule, and global batches that do not split evenly over the
  workers, are refused before anything starts;
* `python -m prado_dist.train --workers 2` writes its figures and tables.

Equivalence needs a model without BatchNorm: on the CPU each worker normalises its own shard with its
own batch statistics (SyncBatchNorm is GPU-only), so a BN model legitimately differs between 1 and 2
workers. `plain_cnn` (prado_dist/models/plain.py) is that model; it is registered in the package, not
here, because Ray workers are separate processes that only see registered models.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from prado_dist.config import TrainConfig
from prado_dist.data import PreparedData, prepare_data, split_counts
from prado_dist.data.demo import make_demo_dataset
from prado_dist.distributed import (
    CHECKPOINT_FILE,
    ResourceError,
    WorkerResources,
    build_trainer,
    check_fits,
    load_ray_checkpoint,
    max_concurrent_runs,
    run_training,
)
from prado_dist.distributed.trainer import torch_config
from prado_dist.engine import TrainingRun, load_checkpoint, save_checkpoint
from tests.conftest import local_ray

pytestmark = pytest.mark.ray

IMAGE_SIZE = 32
RAY_CPUS = 4  # logical CPUs; more than this machine's cores is fine, Ray only counts them
TRAIN_WORKER_TITLE = "ray::RayTrainWorker"  # the process title Ray gives a Train V2 worker actor


# --- fixtures and helpers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """150 generated images (48 px sources) and their decoded 32 px cache: 96 train / 23 val / 31 test."""
    root = tmp_path_factory.mktemp("distributed")
    make_demo_dataset(root / "demo", images=150, size=48)
    return root


@pytest.fixture(scope="module")
def demo_data(demo_root: Path) -> PreparedData:
    config = tiny_config(demo_root)
    return prepare_data(config.data_dir, config.image_size, cache_dir=config.cache_dir)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """One local Ray for the module's Ray tests; yields its private temp dir."""
    with local_ray(num_cpus=RAY_CPUS) as temp_dir:
        yield temp_dir


def tiny_config(root: Path, **overrides: Any) -> TrainConfig:
    """The BN-free model without random augmentation (per-rank draws would differ), on the CPU."""
    base = TrainConfig(
        data_dir=root / "demo",
        cache_dir=root / "cache",
        image_size=IMAGE_SIZE,
        model="plain_cnn",
        epochs=1,
        batch_size=32,
        flip_prob=0.0,
        pca_std=0.0,
        device="cpu",
    )
    return base.with_overrides(overrides)


def final_state(result: Any) -> dict[str, Any]:
    """The latest checkpoint of a Ray Train result."""
    return load_ray_checkpoint(result.checkpoint)


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        difference = (actual[name].float() - tensor.float()).abs().max().item()
        assert difference <= atol, f"{name}: weights differ by {difference:.2e} (tolerance {atol:.0e})"


def assert_same_evaluation(actual: dict[str, float], expected: dict[str, float]) -> None:
    """Equal confusion-derived metrics (exact) and validation loss (to float rounding)."""
    for key, value in expected.items():
        if key.startswith("val_") and key != "val_loss":
            assert actual[key] == value, key
    assert actual["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-5)


def own_train_workers() -> set[int]:
    """PIDs of Ray Train worker processes started by *this* test process's Ray (the machine is shared)."""
    ps = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True, check=True)
    listing = ps.stdout
    parents: dict[int, int] = {}
    workers = []
    for line in listing.splitlines()[1:]:
        pid, ppid, *args = line.split(maxsplit=2)
        parents[int(pid)] = int(ppid)
        if args and args[0].startswith(TRAIN_WORKER_TITLE):
            workers.append(int(pid))

    def descends_from_us(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == os.getpid():
                return True
        return False

    return {pid for pid in workers if descends_from_us(pid)}


def controller_log_lines(ray_temp_dir: str, run_name: str, needle: str) -> list[str]:
    """Lines of the Train controller's JSON logs of run `run_name` that contain `needle`."""
    lines = []
    for log in Path(ray_temp_dir).glob("session_*/logs/train/ray-train-app-controller-*.log"):
        lines += [line for line in log.read_text().splitlines() if needle in line and f'"{run_name}"' in line]
    return lines


# --- the CLI (first: it starts its own Ray, better before this module's Ray is up) ----------------


@pytest.mark.slow
def test_train_cli_with_two_workers_writes_report(demo_root: Path, tmp_path: Path) -> None:
    ray_temp_dir = tempfile.mkdtemp(prefix="ray-cli-", dir="/tmp")  # short: Ray's socket paths are limited
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_temp_dir, PRADO_DIST_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "prado_dist.train",
        "--model",
        "mobilenet",
        "--workers",
        "2",
        "--image-size",
        str(IMAGE_SIZE),
        "--epochs",
        "2",
        "--set",
        "bn_momentum=0.3",
        "--set",  # averaged weights under DDP: validated, checkpointed and tested
        "ema_decay=0.9",
        "--data",
        str(demo_root / "demo"),
        "--out",
        str(out),
    ]
    try:
        finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    finally:
        shutil.rmtree(ray_temp_dir, ignore_errors=True)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    for name in ("confusion_matrix.png", "confusion_matrix.csv", "learning_curves.png", "test_metrics.json"):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert 0.0 <= metrics["test_balanced_accuracy"] <= 1.0
    assert [entry["epoch"] for entry in json.loads((out / "history.json").read_text())] == [0, 1]
    config = json.loads((out / "config.json").read_text())
    assert config["bn_momentum"] == 0.3 and config["ema_decay"] == 0.9


# --- data parallelism equals the single process ----------------------------------------------------


def test_two_workers_match_one_process(ray_cluster: str, demo_root: Path, demo_data: PreparedData) -> None:
    train_images = sum(split_counts(demo_data)["train"])
    # One global batch = the whole training split: epoch 0 is exactly one optimizer step, epoch 1 a second.
    # Each worker gets half of it; equal shards are what makes gradient averaging equal the global mean.
    assert train_images % 2 == 0, train_images
    config = tiny_config(demo_root, epochs=2, batch_size=train_images)

    single = TrainingRun(config, demo_data)
    assert len(single.loaders["train"]) == 1
    weights_after: dict[int, dict[str, torch.Tensor]] = {}

    def keep_weights(epoch: int, _: dict[str, float], run: TrainingRun) -> None:
        weights_after[epoch] = {key: value.clone() for key, value in run.network.state_dict().items()}

    single.fit(keep_weights)

    result = run_training(
        config, WorkerResources(workers=2), storage=demo_root / "ray", name="two-workers", max_failures=0
    )
    assert result.error is None
    assert result.metrics["devices"] == "cpu,cpu"  # each rank's device, in rank order
    states = {}
    for checkpoint, _ in result.best_checkpoints:  # keep_checkpoints=2: both epochs are kept
        state = load_ray_checkpoint(checkpoint)
        states[int(state["epoch"])] = state
    assert sorted(states) == [0, 1]
    for epoch in (0, 1):  # after one, then two optimizer steps
        assert_same_weights(states[epoch]["model"], weights_after[epoch], atol=1e-5)
        assert_same_evaluation(states[epoch]["history"][epoch], single.history[epoch])
        assert states[epoch]["history"][epoch]["train_loss"] == pytest.approx(
            single.history[epoch]["train_loss"], rel=1e-5
        )


@pytest.mark.parametrize(
    ("workers", "gpus_per_worker", "backend"),
    [(1, 0, None), (2, 0, None), (1, 0.5, None), (2, 1, None), (2, 0.5, "gloo"), (4, 0.25, "gloo")],
)
def test_workers_that_may_share_a_gpu_reduce_over_gloo(workers: int, gpus_per_worker: float, backend) -> None:
    # None: Ray's default, NCCL on GPUs. Fractional-GPU workers of one run may land on one GPU, where
    # NCCL refuses to start (tests/test_cuda.py runs two such workers).
    resources = WorkerResources(workers=workers, gpus_per_worker=gpus_per_worker)
    assert torch_config(resources).backend == backend


# --- fault tolerance ------------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_worker_is_replaced_and_training_resumes(ray_cluster: str, demo_root: Path) -> None:
    epochs, name = 8, "killed-worker"
    config = tiny_config(demo_root, epochs=epochs)
    outcome: dict[str, Any] = {}

    def train() -> None:
        try:
            outcome["result"] = run_training(
                config, WorkerResources(workers=2), storage=demo_root / "ray", name=name, max_failures=2
            )
        except BaseException as err:  # reported by the assertions below
            outcome["error"] = err

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    run_dir = demo_root / "ray" / name
    deadline = time.monotonic() + 180
    while not list(run_dir.glob(f"checkpoint_*/{CHECKPOINT_FILE}")):
        assert thread.is_alive(), f"training ended before its first checkpoint: {outcome}"
        assert time.monotonic() < deadline, "no checkpoint after 180 s"
        time.sleep(0.1)
    before = own_train_workers()
    assert len(before) == 2, f"expected 2 training worker processes of ours, found {before}"
    assert thread.is_alive()
    os.kill(min(before), signal.SIGKILL)

    seen = set(before)
    while thread.is_alive() and time.monotonic() < deadline + 180:
        seen |= own_train_workers()
        time.sleep(0.2)
    thread.join(timeout=1)
    assert not thread.is_alive(), "training did not finish within 6 minutes"
    assert "error" not in outcome, outcome.get("error")

    state = final_state(outcome["result"])
    assert int(state["epoch"]) == epochs - 1
    assert [int(entry["epoch"]) for entry in state["history"]] == list(range(epochs))
    # The kill was taken: Ray's failure policy retried, with new worker processes.
    retries = controller_log_lines(ray_cluster, name, "[FailurePolicy] RETRY")
    assert retries, "no restart in the controller log"
    assert seen - before, "no replacement worker process was started"


# --- resuming continues the schedule ---------------------------------------------------------------


def test_resumed_engine_run_continues_schedule_and_weights(
    demo_root: Path, demo_data: PreparedData, tmp_path: Path
) -> None:
    # Augmentation on: its draws are seeded per epoch, so a resumed run repeats them exactly.
    config = tiny_config(demo_root, epochs=4, decay_start=1, decay=0.5, flip_prob=0.5, pca_std=0.1)
    uninterrupted = TrainingRun(config, demo_data)
    uninterrupted.fit()

    first = TrainingRun(config, demo_data)
    for epoch in range(2):
        first.history.append(first.run_epoch(epoch))
    save_checkpoint(tmp_path / "epoch1.pt", first.state_dict(epoch=1))
    resumed = TrainingRun(config, demo_data)
    resumed.load_state_dict(load_checkpoint(tmp_path / "epoch1.pt"))
    assert resumed.start_epoch == 2
    resumed.fit()

    expected_lrs = [config.lr * torch.exp(torch.tensor(-0.5 * e)).item() for e in range(4)]
    assert [m["lr"] for m in uninterrupted.history] == pytest.approx(expected_lrs, rel=1e-6)
    assert [m["lr"] for m in resumed.history] == [m["lr"] for m in uninterrupted.history]
    assert [m["epoch"] for m in resumed.history] == [0, 1, 2, 3]
    assert_same_weights(resumed.network.state_dict(), uninterrupted.network.state_dict(), atol=1e-6)
    assert_same_evaluation(resumed.history[-1], uninterrupted.history[-1])


def test_ray_rerun_with_same_name_resumes_at_next_epoch(
    ray_cluster: str, demo_root: Path, demo_data: PreparedData
) -> None:
    config = tiny_config(demo_root, epochs=4, decay_start=1, decay=0.5, flip_prob=0.5, pca_std=0.1)
    storage, name = demo_root / "ray", "rerun"
    first = final_state(
        run_training(config.with_overrides({"epochs": 2}), WorkerResources(workers=1), storage=storage, name=name)
    )
    second = final_state(run_training(config, WorkerResources(workers=1), storage=storage, name=name))

    assert [int(m["epoch"]) for m in second["history"]] == [0, 1, 2, 3]
    # Epochs 0-1 were not trained again: their records, wall-clock timings included, are the first run's.
    assert second["history"][:2] == first["history"]
    uninterrupted = TrainingRun(config, demo_data)
    uninterrupted.fit()
    assert [m["lr"] for m in second["history"]] == [m["lr"] for m in uninterrupted.history]
    # A Ray worker runs 1 intra-op thread, this process more: same maths, different summation order.
    assert_same_weights(second["model"], uninterrupted.network.state_dict(), atol=1e-5)


# --- reading checkpoints ------------------------------------------------------------------------


def test_reading_a_ray_checkpoint_leaves_no_copy_behind(
    demo_root: Path, demo_data: PreparedData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow.fs
    import ray.train

    run = TrainingRun(tiny_config(demo_root), demo_data)
    saved = tmp_path / "storage" / "checkpoint_000000"
    save_checkpoint(saved / CHECKPOINT_FILE, run.state_dict(epoch=0))
    temp = tmp_path / "temp"  # where Ray downloads checkpoints (`tempfile.gettempdir()`)
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    # A filesystem other than pyarrow's LocalFileSystem stands for remote storage (S3, GCS): Ray copies.
    remote = pyarrow.fs.SubTreeFileSystem(str(tmp_path / "storage"), pyarrow.fs.LocalFileSystem())
    for checkpoint in (
        ray.train.Checkpoint.from_directory(saved),
        str(saved),  # a checkpoint URI, as Tune's results give them
        ray.train.Checkpoint("checkpoint_000000", filesystem=remote),
    ):
        assert load_ray_checkpoint(checkpoint)["epoch"] == 0
    assert list(temp.iterdir()) == []
    assert ray.train.Checkpoint("checkpoint_000000", filesystem=remote).to_directory()  # what leaked before
    assert [p.name.startswith("checkpoint_tmp_") for p in temp.iterdir()] == [True]


# --- resource sizing ------------------------------------------------------------------------------


def test_autoscaling_cluster_leaves_missing_nodes_to_the_autoscaler(monkeypatch, caplog) -> None:
    # GPU nodes of clusters/*.yaml start at 0: the first search would be refused without this.
    from prado_dist.distributed import resources

    monkeypatch.setattr(resources.ray, "cluster_resources", lambda: {"CPU": 4.0})  # a head node alone
    gpu_trial = WorkerResources(workers=1, gpus_per_worker=1)
    with pytest.raises(ResourceError, match="can never be scheduled"):
        check_fits(gpu_trial, concurrent=4)
    monkeypatch.setenv(resources.AUTOSCALING_ENV, "1")
    with caplog.at_level("WARNING", logger=resources.__name__):
        check_fits(gpu_trial, concurrent=4)
        assert max_concurrent_runs(gpu_trial) == 1
    assert "left to the autoscaler: 4 x 1 workers x 1 GPUs = 4 GPUs, but the cluster has 0" in caplog.text
    assert "pass --max-concurrent K" in caplog.text


def test_local_ray_polls_train_workers_faster_unless_told_otherwise(ray_cluster: str, monkeypatch) -> None:
    # Every process of the job, Ray Train's controller included, gets the interval from the job's
    # runtime environment; the controller reads it when it starts.
    import ray

    from prado_dist.distributed import resources

    @ray.remote(num_cpus=0)
    def seen_by_a_ray_worker() -> str | None:
        return os.environ.get(resources.HEALTH_CHECK_ENV)

    assert ray.get(seen_by_a_ray_worker.remote()) == str(resources.LOCAL_HEALTH_CHECK_INTERVAL_S)
    monkeypatch.setenv(resources.HEALTH_CHECK_ENV, "3")  # a user's own setting wins
    assert resources.local_ray_init_kwargs(2)["runtime_env"] == {"env_vars": {resources.HEALTH_CHECK_ENV: "3"}}


def test_unschedulable_requests_are_refused_before_starting(ray_cluster: str, demo_root: Path) -> None:
    with pytest.raises(ResourceError, match=r"3 workers x 2(\.0)? CPUs = 6 CPUs, but the cluster has 4"):
        check_fits(WorkerResources(workers=3, cpus_per_worker=2))
    with pytest.raises(ResourceError, match=r"1 workers x 1(\.0)? GPUs = 1 GPUs, but the cluster has 0"):
        check_fits(WorkerResources(workers=1, gpus_per_worker=1))
    with pytest.raises(ResourceError, match=r"3 x 2 workers x 1(\.0)? CPUs = 6 CPUs"):
        check_fits(WorkerResources(workers=2), concurrent=3)
    check_fits(WorkerResources(workers=2), concurrent=2)
    assert max_concurrent_runs(WorkerResources(workers=2)) == 2

    started = time.monotonic()
    with pytest.raises(ResourceError, match="can never be scheduled"):
        run_training(tiny_config(demo_root), WorkerResources(workers=5), storage=demo_root / "ray", name="too-big")
    assert time.monotonic() - started < 5
    assert not (demo_root / "ray" / "too-big").exists()  # nothing was started or written
    assert not own_train_workers()


def test_global_batch_that_does_not_split_is_refused_before_starting(ray_cluster: str, demo_root: Path) -> None:
    # Refused inside every worker, the batch used to cost max_failures restarts (38 s here) and a traceback.
    started = time.monotonic()
    with pytest.raises(ResourceError, match="global batch size 32 does not split evenly over 3 workers.*30 or 33"):
        run_training(
            tiny_config(demo_root, batch_size=32),
            WorkerResources(workers=3),
            storage=demo_root / "ray",
            name="uneven-batch",
        )
    assert time.monotonic() - started < 5
    assert not (demo_root / "ray" / "uneven-batch").exists()
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "prado_dist.train",
            "--workers",
            "3",
            "--batch-size",
            "32",
            "--data",
            str(demo_root / "demo"),
            "--out",
            str(demo_root / "uneven-cli"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 2, cli.stderr[-2000:]
    assert "error: the global batch size 32 does not split evenly over 3 workers" in cli.stderr
    assert not (demo_root / "uneven-cli").exists()  # refused before the images are decoded


def test_rerun_of_a_finished_run_reports_its_final_metrics(ray_cluster: str, demo_root: Path, tmp_path: Path) -> None:
    """A Tune trial whose driver was killed after its Train run finished reruns that run on resume.
    With nothing left to train, the run must still report its final epoch: Tune only sees what is
    reported in this session (TuneReportCallback), and a trial without its metric fails the search."""
    import ray.train

    reports = tmp_path / "reports.jsonl"

    class RecordReports(ray.train.UserCallback):  # defined here: pickled by value to the controller
        def after_report(self, run_context, metrics, checkpoint) -> None:
            with open(reports, "a") as file:
                file.write(json.dumps({k: v for k, v in metrics[0].items() if isinstance(v, int | float)}) + "\n")

    config = tiny_config(demo_root, epochs=1)
    for _ in range(2):
        build_trainer(config, WorkerResources(), storage=tmp_path, name="finished", callbacks=[RecordReports()]).fit()
    first, *again = reports.read_text().splitlines()
    assert len(again) == 1, again  # reported once more, without training again
    assert json.loads(again[0])["epochs_completed"] == 1
