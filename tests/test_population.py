"""Population-based search (PBT, PB2): the space format, the exploit record, the winning schedule and
its replay; end to end on a 2-CPU local Ray with the demo data."""

from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from prado_dist import train
from prado_dist.config import ConfigError, TrainConfig
from prado_dist.engine import config_from_schedule, load_checkpoint, schedule_record
from prado_dist.search import SearchSettings, load_space, run_search
from prado_dist.search.population import WithinBounds, read_exploits, write_lineage
from tests.conftest import local_ray
from tests.test_search import kill_session

POPULATION = {"num_samples": 4, "epochs": 4, "image_size": 32, "scheduler.perturbation_interval": 1}


# --- without Ray ------------------------------------------------------------------------------------
def test_a_population_searches_only_settings_that_can_change_during_a_run() -> None:
    assert load_space("demo", {"scheduler.kind": "pbt"}).scheduler.population_based
    with pytest.raises(ConfigError, match=r"\['dropout'\] cannot change during a run"):
        load_space(
            "demo", {"scheduler.kind": "pbt", "params": {"dropout": {"distribution": "uniform", "low": 0, "high": 0.5}}}
        )
    with pytest.raises(ConfigError, match=r"pb2 models continuous bounds, and \['flip_prob'\] are choices"):
        load_space("demo", {"scheduler.kind": "pb2"})
    assert load_space("demo", {"scheduler.kind": "pb2", "flip_prob": 0.5}).scheduler.kind == "pb2"
    with pytest.raises(ConfigError, match="scheduler.kind"):
        load_space("demo", {"scheduler.kind": "hyperband"})


def test_perturbed_values_stay_inside_the_space_and_whole() -> None:
    within = WithinBounds({"lr": (1e-4, 1e-2), "decay_start": (0, 10)}, integers={"decay_start"})
    assert within({"lr": 0.012, "decay_start": 10.8, "pca_std": 9.0}) == {"lr": 1e-2, "decay_start": 10, "pca_std": 9.0}
    assert within({"lr": 5e-5, "decay_start": 3.4}) == {"lr": 1e-4, "decay_start": 3}


def test_exploits_are_read_once_each_and_tabled(tmp_path: Path) -> None:
    event = {"trial": "b", "epoch": 2, "copied": "a", "copied_epoch": 2, "changes": {"lr": [1e-3, 1.2e-3]}}
    again = {**event, "copied_epoch": 3}  # copied again after its same epoch 2, the donor now further on
    later = {**event, "epoch": 3, "copied_epoch": 3}
    lines = [json.dumps(event), json.dumps(event), "", json.dumps(again), json.dumps(later)]  # a resume re-logs
    (tmp_path / "exploits.jsonl").write_text("\n".join(lines))
    events = read_exploits(tmp_path)
    assert events == [event, again, later]
    table = write_lineage(events, tmp_path / "lineage.csv").read_text().splitlines()
    assert table[0] == "trial,after_epoch,copied,copied_epoch,lr_from,lr"
    assert table[1] == "b,2,a,2,0.001,0.0012"


def test_a_schedule_record_replays_as_the_same_settings_epoch_by_epoch() -> None:
    rows = [
        {"epoch": 0, "lr": 1e-3, "pca_std": 0.1},
        {"epoch": 1, "lr": 1e-3, "pca_std": 0.1},
        {"epoch": 2, "lr": 2e-3, "pca_std": 0.1},
        {"epoch": 3, "lr": 2e-3, "pca_std": 0.25},
    ]
    record = schedule_record(TrainConfig(model="mobilenet", image_size=32, device="cpu"), rows, trial="t1")
    assert record["config"]["epochs"] == 4 and "device" not in record["config"]
    config = config_from_schedule(record)
    assert (config.model, config.epochs, config.lr, config.pca_std) == ("mobilenet", 4, 1e-3, 0.1)
    assert config.schedule == {2: {"lr": 2e-3}, 3: {"pca_std": 0.25}}
    assert [config.settings_at(epoch).lr for epoch in range(4)] == [1e-3, 1e-3, 2e-3, 2e-3]
    with pytest.raises(ConfigError, match="without gaps"):
        config_from_schedule({**record, "epochs": [rows[0], rows[2]]})
    with pytest.raises(ConfigError, match="not a prado_dist schedule"):
        config_from_schedule({"epochs": rows})


def test_train_takes_any_setting_with_set_and_refuses_to_override_a_schedule(tmp_path: Path) -> None:
    args = train.build_parser().parse_args(["--lr", "3e-3", "--set", "pca_std=0", "--set", "ema_decay=0.97"])
    config = train.config_from_args(args, None)
    assert (config.lr, config.pca_std, config.ema_decay, config.epochs) == (3e-3, 0.0, 0.97, TrainConfig().epochs)
    assert train.main(["--set", "pca_sd=0", "--single-process"]) == 2  # a typo: exit 2, nothing trained
    record = schedule_record(TrainConfig(model="mobilenet"), [{"epoch": 0, "lr": 1e-3}])
    (tmp_path / "schedule.json").write_text(json.dumps(record))
    args = train.build_parser().parse_args(["--schedule", str(tmp_path / "schedule.json"), "--lr", "1e-2"])
    with pytest.raises(ConfigError, match=r"--schedule sets \['lr'\] epoch by epoch"):
        train.config_from_args(args, None)


# --- end to end -------------------------------------------------------------------------------------
def final_checkpoint(search: Path, trial_id: str) -> dict:
    (folder,) = search.glob(f"run_trial_{trial_id}_*")
    newest = max(folder.glob("checkpoint_*"), key=lambda path: path.name)
    return load_checkpoint(newest / "checkpoint.pt")


@pytest.fixture(scope="module")
def pbt_search(small_demo: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("pbt")
    space = load_space("demo", {**POPULATION, "scheduler.kind": "pbt"})
    settings = SearchSettings(
        space=space,
        data_dir=small_demo,
        storage=str(folder / "runs"),
        mlflow_uri=f"sqlite:///{folder}/mlflow.db",
        name="pbt",
    )
    with local_ray(num_cpus=2):
        outcome = run_search(settings)
    return outcome, folder


@pytest.mark.ray
@pytest.mark.slow
def test_pbt_members_copy_checkpoints_and_go_on_with_perturbed_settings(pbt_search) -> None:
    outcome, folder = pbt_search
    search = folder / "runs" / "pbt"
    events = read_exploits(search)
    assert events, "no member copied another (4 members, a perturbation every epoch)"
    assert len(outcome.trials) == 4 and all(trial["epochs"] == 4 for trial in outcome.trials.values())
    # The newest exploit of a member: its final checkpoint carries the donor's epochs, then the
    # perturbed settings from the epoch after the copy on, at the decayed learning rate they imply.
    newest = {event["trial"]: event for event in events}
    for trial_id, event in newest.items():
        state = final_checkpoint(search, trial_id)
        settings = state["settings_history"]
        assert [row["epoch"] for row in settings] == [0, 1, 2, 3]
        after_copy = settings[event["copied_epoch"]]
        for key, (_, new) in event["changes"].items():
            assert after_copy[key] == pytest.approx(new)
        row = state["history"][event["copied_epoch"]]
        factor = math.exp(-after_copy["decay"] * max(0, event["copied_epoch"] - after_copy["decay_start"] + 1))
        assert row["lr"] == pytest.approx(after_copy["lr"] * factor)
    # The record: lineage table and schedule on the parent, each exploit tagged on its member's child run.
    summary = search / "summary"
    assert len((summary / "lineage.csv").read_text().splitlines()) == len(events) + 1
    assert (summary / "schedule.png").stat().st_size > 0
    schedule = json.loads((summary / "schedule.json").read_text())
    assert schedule["trial"] == outcome.best_trial_id
    assert len(schedule["epochs"]) == int(outcome.best_val["epochs_completed"])
    with sqlite3.connect(folder / "mlflow.db") as db:
        tags = db.execute("select count(*) from tags where key like 'pbt.copy_%'").fetchone()[0]
        parent_status = db.execute("select status from runs where run_uuid = ?", (outcome.parent_run_id,)).fetchone()[0]
    assert tags == len(events) and parent_status == "FINISHED"


@pytest.mark.ray
@pytest.mark.slow
def test_the_winning_schedule_replays_on_a_fresh_model(pbt_search, small_demo: Path, tmp_path: Path) -> None:
    _, folder = pbt_search
    schedule = json.loads((folder / "runs" / "pbt" / "summary" / "schedule.json").read_text())
    out = tmp_path / "replay"
    code = train.main(
        [
            "--single-process",
            "--schedule",
            str(folder / "runs/pbt/summary/schedule.json"),
            "--data",
            str(small_demo),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    replayed = load_checkpoint(out / "last.pt")["settings_history"]
    assert replayed == schedule["epochs"]  # every epoch trained with the recorded settings
    assert json.loads((out / "config.json").read_text())["model"] == schedule["config"]["model"]


@pytest.mark.ray
@pytest.mark.slow
def test_pb2_search_perturbs_within_the_bounds(small_demo: Path, tmp_path: Path) -> None:
    space = load_space("demo", {**POPULATION, "epochs": 3, "scheduler.kind": "pb2", "flip_prob": 0.5})
    settings = SearchSettings(
        space=space,
        data_dir=small_demo,
        storage=str(tmp_path / "runs"),
        mlflow_uri=f"sqlite:///{tmp_path}/m.db",
        name="pb2",
    )
    with local_ray(num_cpus=2):
        outcome = run_search(settings)
    events = read_exploits(tmp_path / "runs" / "pb2")
    assert events and len(outcome.trials) == 4
    for event in events:
        for key, (_, new) in event["changes"].items():
            spec = space.params[key]
            assert spec.low <= new <= spec.high
        assert isinstance(event["changes"]["decay_start"][1], int)
    assert (tmp_path / "runs" / "pb2" / "summary" / "schedule.json").is_file()


def logged_epochs(db: Path) -> dict[str, int]:
    """Epochs each trial's MLflow run holds so far (trial id -> count), read while the search runs."""
    if not db.exists():
        return {}
    try:
        with sqlite3.connect(db) as connection:
            rows = connection.execute(
                "select t.value, count(distinct m.step) from metrics m join tags t on t.run_uuid = m.run_uuid "
                "where t.key = 'trial_id' and m.key = 'val_balanced_accuracy' group by t.value"
            ).fetchall()
    except sqlite3.Error:  # the driver is writing its first tables
        return {}
    return dict(rows)


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_population_resumes_where_its_members_were(small_demo: Path, tmp_path: Path) -> None:
    storage, db = tmp_path / "runs", tmp_path / "mlflow.db"
    ray_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_dir, "PYTHONUNBUFFERED": "1"}
    command = [
        *(sys.executable, "-m", "prado_dist.tune", "--space", "demo", "--data", str(small_demo), "--num-cpus", "2"),
        *("--storage", str(storage), "--name", "population", "--mlflow-uri", f"sqlite:///{db}"),
        *(f"--set={key}={value}" for key, value in {**POPULATION, "scheduler.kind": "pbt"}.items()),
    ]
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 400
        while sum(logged_epochs(db).values()) < 6:  # of 4 members x 4 epochs
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the population trained too slowly"
            time.sleep(0.5)
        kill_session(first, ray_dir)
    before = logged_epochs(db)

    second = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    summary = json.loads((storage / "population" / "summary" / "summary.json").read_text())
    assert len(summary["trials"]) == 4  # the population of the first run, none added
    for trial in summary["trials"].values():  # every member trained to the end
        # A member's curve is what it reported, in order: one that copied a donor's older epoch reports
        # that epoch's successor again ([1, 2, 3, 3, 4]: at epoch 3 it copied a donor's epoch 2).
        epochs = [epoch for epoch, _ in trial["curve"]]
        assert trial["epochs"] == 4 and epochs[-1] == 4 and epochs[0] == 1, trial
    # (Which epoch a member resumes from is Tune's: the newest checkpoint its experiment state had
    # saved before the kill, which may be none yet, so that is not asserted.)
    assert sum(before.values()) < 16 and (storage / "population" / "summary" / "schedule.json").is_file()
