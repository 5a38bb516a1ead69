"""Clean-up after data-parallel trials, which nest a Ray Train run in a Tune trial (ray-project/ray#54305).

Only trials that run Ray Train (`trial.workers` >= 2 or `trial.ray_train: always`) need this; the
default one-worker trial trains in its own Tune actor and uses no private Ray API (issue 20).
Everything here reads or ends Ray internals, kept in this one module for that reason:

1. When ASHA stops a trial, Tune kills the trial actor; the Train controller it owns dies with it,
   ungracefully. Train V2's PlacementGroupCleaner should then remove the workers' placement group, but
   it detects the controller's death through the State API, which needs the dashboard; without one
   the group (and its CPUs) stays reserved until the driver exits and the next trial's workers never
   start. `PlacementGroupReleaser` removes the group of every trial that ends, by the id it reported.
2. A trial stopped before its first report has reported no id, and a group still pending when its
   controller died is created afterwards, reserved for nobody. Ray removes a placement group only
   when its creator actor and job are dead, so the driver sweeps the job's groups whose creator is
   dead, read from the GCS table (`release_orphaned_placement_groups`).
3. Each Train run leaves a detached PlacementGroupCleaner process polling the State API for good;
   `stop_orphaned_cleaners` ends those of finished runs (`bench/README.md` has the measurements).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import ray
from ray import tune
from ray.tune.experiment import Trial
from ray.util.placement_group import PlacementGroup

logger = logging.getLogger(__name__)


class PlacementGroupReleaser(tune.Callback):
    """Remove the Ray Train placement group of every trial that ends (stopped, finished or failed),
    and every placement group of this job whose creator has died (see the module docstring)."""

    SWEEP_EVERY_S = 2.0

    def __init__(self) -> None:
        self._placement_groups: dict[str, str] = {}
        self._last_sweep = 0.0

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info) -> None:
        if result.get("placement_group_id"):
            self._placement_groups[trial.trial_id] = result["placement_group_id"]

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        self._release(trial)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        self._release(trial)

    def on_step_end(self, iteration: int, trials: list[Trial], **info) -> None:
        # A killed trial's controller dies a moment after Tune reports the trial ended; sweep again later.
        if time.monotonic() - self._last_sweep >= self.SWEEP_EVERY_S:
            self._last_sweep = time.monotonic()
            release_orphaned_placement_groups()

    def on_experiment_end(self, trials: list[Trial], **info) -> None:
        # Trials ended without a completion event (e.g. a search-wide stop) still hold theirs.
        for group_id in self._placement_groups.values():
            release_placement_group(group_id)
        self._placement_groups.clear()
        release_orphaned_placement_groups(wait_s=10.0)  # the last trials' controllers are being stopped
        stop_orphaned_cleaners(every_one=True)  # every trial actor is stopped by now

    def _release(self, trial: Trial) -> None:
        group_id = self._placement_groups.pop(trial.trial_id, None)
        if group_id:
            release_placement_group(group_id)
        release_orphaned_placement_groups()
        stop_orphaned_cleaners()


def release_orphaned_placement_groups(wait_s: float = 0.0) -> int:
    """Remove this job's placement groups whose creator actor is dead; returns how many.

    With `wait_s`, first wait (up to that long) for the creator actors of the job's remaining
    placement groups to die, e.g. the controllers of trials that Tune is stopping.
    """
    deadline = time.monotonic() + wait_s
    while True:
        groups = _job_placement_groups()
        waiting_on_live_creator = not all(groups.values())
        if not waiting_on_live_creator or time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    released = sum(release_placement_group(group_id) for group_id, dead in groups.items() if dead)
    if released:
        logger.info("released %d placement group(s) left by trials that ended before reporting", released)
    return released


def _job_placement_groups() -> dict[str, bool]:
    """{group id: creator actor dead} of this job's live groups that an actor created.

    Groups the driver created itself (Tune's trial groups) have no creator actor and are left to Tune.
    `ray.util.placement_group_table` does not show the creator, so the GCS records are read directly.
    """
    from ray._private import state  # the GCS table; ray.util.state would need the dashboard
    from ray.core.generated import gcs_pb2

    try:
        job = bytes.fromhex(ray.get_runtime_context().get_job_id())
        records = state.state._connect_and_get_accessor().get_placement_group_table()
    except Exception as err:  # best effort: never let clean-up fail a search
        logger.debug("cannot read the placement group table: %s", err)
        return {}
    groups = {}
    for raw in records:
        record = gcs_pb2.PlacementGroupTableData.FromString(raw)
        creator = record.creator_actor_id
        if (
            record.state == gcs_pb2.PlacementGroupTableData.REMOVED
            or record.is_detached
            or record.creator_job_id != job
            or not creator.strip(b"\xff")  # nil: created by the driver
        ):
            continue
        groups[record.placement_group_id.hex()] = record.creator_actor_dead
    return groups


def release_placement_group(group_id: str) -> bool:
    """Remove placement group `group_id` (hex) unless it is already gone; True if removed here."""
    state = ray.util.placement_group_table().get(group_id, {}).get("state")
    if state in (None, "REMOVED"):
        return False
    try:
        ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id))))
    except Exception as err:  # removed concurrently by the controller's own shutdown
        logger.debug("placement group %s: %s", group_id, err)
        return False
    logger.info("released placement group %s of a stopped trial", group_id[:12])
    return True


def stop_orphaned_cleaners(every_one: bool = False) -> int:
    """End the PlacementGroupCleaner actors that this job's ended Train runs left on this node.

    Every Train run starts a detached PlacementGroupCleaner that polls the State API once a second
    until its controller is dead. Without the dashboard it never learns that, so each trial that Tune
    kills (an ASHA stop; with ASHA also every trial at its last epoch, which is max_t) leaves one
    Ray worker process behind until Ray shuts down, or for good on a persistent cluster, since it is
    detached. Measured: 12 alive after a 12-trial search (bench/search_load.py). Its placement group
    is released above; here the process is ended. The GCS actor table (no dashboard needed) names a
    cleaner's owner, its controller. A cleaner is ended when that controller is dead, or always with
    `every_one` once no Train run of the job is left. Only cleaners on this node can be reached, by
    pid: Train puts them on the head node, where the driver normally runs. Returns how many were ended.
    """
    from ray._private import state  # the GCS actor table; ray.util.state would need the dashboard

    try:
        context = ray.get_runtime_context()
        actors = list(state.actors(job_id=ray.JobID.from_hex(context.get_job_id())).values())
        node = context.get_node_id()
    except Exception as err:  # best effort: never let clean-up fail a search
        logger.debug("cannot read the actor table: %s", err)
        return 0

    def address(entry: dict) -> tuple[str, int]:
        return entry["IPAddress"], entry["Port"]

    controllers = [actor for actor in actors if actor["ActorClassName"] == "TrainController"]
    alive = {address(actor["Address"]) for actor in controllers if actor["State"] != "DEAD"}
    dead = {address(actor["Address"]) for actor in controllers if actor["State"] == "DEAD"}
    ended = 0
    for actor in actors:
        if actor["ActorClassName"] != "PlacementGroupCleaner" or actor["State"] != "ALIVE":
            continue
        owner = address(actor["OwnerAddress"])
        orphaned = every_one or (owner in dead and owner not in alive)
        if orphaned and actor["Address"]["NodeID"] == node and _terminate(actor["Pid"], "ray::PlacementGroupCleaner"):
            ended += 1
    if ended:
        logger.info("ended %d PlacementGroupCleaner actor(s) of finished Train runs", ended)
    return ended


def _terminate(pid: int, expected_title: str) -> bool:
    """SIGTERM `pid` if it is still the process named `expected_title` (pids are reused)."""
    try:
        if not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(expected_title.encode()):
            return False
        os.kill(pid, signal.SIGTERM)
    except OSError:
        return False
    return True
