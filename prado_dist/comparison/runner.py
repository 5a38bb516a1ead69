"""A comparison: one search per space, in turn, at the same budget, each search's MLflow parent run
nested under the comparison's own; then the leaderboard.

The comparison's folder (`STORAGE/NAME`) holds `comparison.json` (what it was asked, its MLflow
parent run, each finished search's row) and the leaderboard files. Its searches live beside it as
`STORAGE/NAME-SPACE`, ordinary searches that `tune --resume` could also continue. `resume=True`
skips the rows already made, reads back a search that ended before its row was written, and
resumes one that was interrupted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param
from ray import tune

from prado_dist.comparison.leaderboard import leaderboard_row, plot_leaderboard, ranked, write_csv, write_markdown
from prado_dist.config import DEFAULT_TRACKING_URI
from prado_dist.engine import load_data
from prado_dist.search import SearchError, SearchInterrupted, SearchSettings, SearchSpace, check_search, load_space
from prado_dist.search.mlflow_experiment import connect
from prado_dist.search.runner import finished_outcome, prepare_search, run_prepared
from prado_dist.search.storage import claim_new_folder, comparable_uri, locate

logger = logging.getLogger(__name__)

STATE_FILE = "comparison.json"


@dataclass
class ComparisonSettings:
    spaces: list[str]  # space names or YAML paths, searched in this order
    data_dir: Path | None  # None: the generated demo set
    overrides: dict[str, Any] = field(default_factory=dict)  # --set, for every space
    epoch_budget: int | None = None  # each search stops once its trials have trained this many epochs
    storage: str = "runs"
    name: str | None = None  # default: compare-<time>; with resume: the newest comparison
    resume: bool = False
    mlflow_uri: str = DEFAULT_TRACKING_URI
    experiment: str = "comparison"
    verbose: bool = False


@dataclass
class Comparison:
    """A comparison's folder, its MLflow parent run and what it has found so far."""

    settings: ComparisonSettings
    spaces: list[SearchSpace]
    folder: Path
    parent_run_id: str = ""
    experiment_id: str = ""
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)  # space name -> leaderboard row
    failed: dict[str, str] = field(default_factory=dict)  # space name -> why its search failed
    started: dict[str, float] = field(default_factory=dict)  # space name -> when its search began (epoch s)

    @property
    def name(self) -> str:
        return self.folder.name

    def leaderboard(self) -> list[dict[str, Any]]:
        return ranked([self.rows[space.name] for space in self.spaces if space.name in self.rows], self.spaces[0].mode)


def load_spaces(settings: ComparisonSettings) -> list[SearchSpace]:
    """Every space with the comparison's overrides, checked before anything runs."""
    if not settings.spaces:
        raise SearchError("a comparison needs at least one space (--spaces NAME ...)")
    spaces = [load_space(name, settings.overrides) for name in settings.spaces]
    names = [space.name for space in spaces]
    if len(set(names)) < len(names):
        raise SearchError(f"--spaces names a space twice: {names}")
    if len({(space.metric, space.mode) for space in spaces}) > 1:
        raise SearchError("the spaces select on different metrics; a leaderboard needs one (--set metric=...)")
    for space in spaces:
        check_search(space)
    return spaces


def open_comparison(settings: ComparisonSettings) -> Comparison:
    """The comparison's folder and state (continued with `resume`), checked against its settings:
    before Ray starts, so that a typo costs seconds."""
    spaces = load_spaces(settings)
    folder = comparison_folder(settings)
    comparison = Comparison(settings, spaces, folder)
    state_file = folder / STATE_FILE
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        check_same_comparison(state["identity"], comparison_identity(settings))
        comparison.parent_run_id, comparison.experiment_id = state["parent_run_id"], state["experiment_id"]
        comparison.rows, comparison.failed = state["rows"], state.get("failed", {})
        comparison.started = state.get("started", {})
    return comparison


def comparison_folder(settings: ComparisonSettings) -> Path:
    """`STORAGE/NAME` (the comparison's own files stay local when the searches go to remote storage)."""
    root = Path("runs") if "://" in settings.storage else Path(settings.storage)
    if settings.resume:
        if settings.name:
            folder = root / settings.name
            if not (folder / STATE_FILE).is_file():
                raise SearchError(f"--resume: {folder} holds no comparison ({STATE_FILE} is missing)")
            return folder
        found = sorted(root.glob(f"*/{STATE_FILE}"), key=lambda path: path.stat().st_mtime)
        if not found:
            raise SearchError(f"--resume: no comparison under {root}; pass --name")
        return found[-1].parent
    if settings.name:
        folder = root / settings.name
        if folder.exists() and any(folder.iterdir()):
            raise SearchError(f"a comparison named {settings.name!r} exists in {root}; pass --resume or another --name")
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    root.mkdir(parents=True, exist_ok=True)
    return root / claim_new_folder(root, f"compare-{time.strftime('%Y%m%d-%H%M%S')}")


def comparison_identity(settings: ComparisonSettings) -> dict[str, Any]:
    return {
        "spaces": list(settings.spaces),
        "overrides": {key: settings.overrides[key] for key in sorted(settings.overrides)},
        "epoch_budget": settings.epoch_budget,
        "data": str(Path(settings.data_dir).resolve()) if settings.data_dir else "demo",
        "mlflow_uri": comparable_uri(settings.mlflow_uri),
        "experiment": settings.experiment,
    }


def check_same_comparison(recorded: dict[str, Any], now: dict[str, Any]) -> None:
    changed = sorted(key for key in recorded.keys() | now.keys() if recorded.get(key) != now.get(key))
    if changed:
        shown = "; ".join(f"{key}: {recorded.get(key)!r} then, {now.get(key)!r} now" for key in changed)
        raise SearchError(
            f"--resume continues a comparison with the settings it started with, and these differ: {shown}; "
            "resume with the same --spaces, --set, --budget-epochs, --data and --mlflow-uri, or start a new one"
        )


def save_state(comparison: Comparison) -> None:
    state = {
        "parent_run_id": comparison.parent_run_id,
        "experiment_id": comparison.experiment_id,
        "identity": comparison_identity(comparison.settings),
        "rows": comparison.rows,
        "failed": comparison.failed,
        "started": comparison.started,
    }
    temporary = comparison.folder / f".{STATE_FILE}.tmp"
    temporary.write_text(json.dumps(state, indent=1))
    temporary.replace(comparison.folder / STATE_FILE)  # a kill never leaves half a state file


def run_comparison(comparison: Comparison) -> Comparison:
    """Run (or resume) every search of an opened comparison on the connected Ray cluster, then the
    leaderboard. A search that fails is named and left out of the table (a resume tries it again);
    Ctrl-C in a search leaves the comparison's parent run KILLED and raises SearchInterrupted."""
    settings = comparison.settings
    client, comparison.experiment_id = connect(settings.mlflow_uri, settings.experiment)
    open_parent_run(client, comparison)
    try:
        for index, space in enumerate(comparison.spaces, start=1):
            if space.name in comparison.rows:
                print(f"[{index}/{len(comparison.spaces)}] {space.name}: in the table already", flush=True)
                continue
            print(f"\n[{index}/{len(comparison.spaces)}] {space.name}: searching {space.model}", flush=True)
            try:
                comparison.rows[space.name] = search_row(comparison, space)
                comparison.failed.pop(space.name, None)
            except SearchInterrupted:
                raise SearchInterrupted(
                    f"comparison {comparison.name} was interrupted in its search of {space.name}; continue it with: "
                    f"--resume --name {comparison.name} (and the same --spaces, --set and --budget-epochs)"
                ) from None
            except SearchError as err:
                logger.warning("the search of %s failed, and is left out of the table: %s", space.name, err)
                comparison.failed[space.name] = str(err)
            save_state(comparison)
    except BaseException as err:
        status = "KILLED" if isinstance(err, SearchInterrupted | KeyboardInterrupt) else "FAILED"
        with contextlib.suppress(Exception):
            client.set_terminated(comparison.parent_run_id, status=status)
        raise
    record_leaderboard(client, comparison)
    return comparison


def open_parent_run(client, comparison: Comparison) -> None:
    """The comparison's MLflow parent run: continued on resume, created (and the state saved) otherwise."""
    if comparison.parent_run_id:
        client.update_run(comparison.parent_run_id, status="RUNNING")
        return
    settings = comparison.settings
    run = client.create_run(comparison.experiment_id, run_name=comparison.name, tags={"comparison": comparison.name})
    params = {f"identity.{key}": json.dumps(value) for key, value in comparison_identity(settings).items()}
    client.log_batch(run.info.run_id, params=[Param(key, value[:6000]) for key, value in params.items()])
    comparison.parent_run_id = run.info.run_id
    save_state(comparison)


def search_settings(comparison: Comparison, space: SearchSpace) -> SearchSettings:
    settings = comparison.settings
    return SearchSettings(
        space=space,
        data_dir=settings.data_dir,
        storage=settings.storage,
        name=f"{comparison.name}-{space.name}",
        mlflow_uri=settings.mlflow_uri,
        experiment=settings.experiment,
        epoch_budget=settings.epoch_budget,
        verbose=settings.verbose,
        parent_run_id=comparison.parent_run_id,
    )


def search_row(comparison: Comparison, space: SearchSpace) -> dict[str, Any]:
    """Search `space` (new, resumed, or read back when it had ended) and make its leaderboard row.

    Its wall time runs from its first start to the end of its summary: an interrupted and resumed
    search counts the pause too (the row cannot know how long the machine stood still)."""
    settings = search_settings(comparison, space)
    location = locate(replace(settings, resume=True))  # where it is, or would be
    started = comparison.started.setdefault(space.name, time.time())
    save_state(comparison)  # a comparison killed from here on still knows when this search began
    if location.summary_file.is_file():  # it ended before the comparison wrote its row
        outcome = finished_outcome(settings)
        data = load_data(space.base_config(data_dir=settings.data_dir))
    else:
        settings.resume = tune.Tuner.can_restore(location.uri)
        prepared = prepare_search(settings)
        outcome, data = run_prepared(prepared), prepared.data
    ended = location.summary_file.stat().st_mtime
    row = leaderboard_row(space, location.name, outcome, data, ended - started)
    print(
        f"{space.name}: tuned validation {space.metric} {row['best_val']:.4f}, test balanced accuracy "
        f"{row['test_balanced_accuracy']:.4f} [{row['test_balanced_accuracy_low']:.3f}, "
        f"{row['test_balanced_accuracy_high']:.3f}] after {row['epochs']} epochs in {row['wall_s']:.0f} s",
        flush=True,
    )
    return row


def record_leaderboard(client, comparison: Comparison) -> None:
    """leaderboard.csv, .md and .png in the folder; on the parent run, the same files and each
    space's scores as metrics; the parent run FINISHED."""
    rows, folder = comparison.leaderboard(), comparison.folder
    write_csv(rows, folder / "leaderboard.csv")
    write_markdown(rows, comparison.spaces[0].metric, folder / "leaderboard.md")
    if rows:
        plot_leaderboard(rows, folder / "leaderboard.png")
    now = int(time.time() * 1000)
    keys = ["best_val", "report_config_val", "test_accuracy", "test_balanced_accuracy", "epochs", "wall_s"]
    metrics = [
        Metric(f"{row['space']}.{key}", float(row[key]), now, 0) for row in rows for key in keys if row[key] is not None
    ]
    try:
        client.log_batch(comparison.parent_run_id, metrics=metrics)
        client.log_artifacts(comparison.parent_run_id, str(folder))
        client.set_terminated(comparison.parent_run_id, status="FAILED" if comparison.failed else "FINISHED")
    except Exception as err:
        logger.warning("could not record the leaderboard in MLflow (%s); it is in %s", err, folder)
