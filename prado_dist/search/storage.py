"""Where a search lives: its folder (named, claimed, checked writable) and the state file beside
Tune's own that ties it to its MLflow parent run and to the settings it was started with."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

from prado_dist.distributed import storage_uri
from prado_dist.search.settings import SearchError, SearchSettings

STATE_FILE = "prado_search.json"  # next to Tune's own state: the MLflow parent run of the search


@dataclass(frozen=True)
class SearchLocation:
    """Where Ray writes the search (`uri`: a local path or s3://...) and this machine's own folder."""

    uri: str
    local: Path

    @property
    def name(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent_uri(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[0]

    @property
    def state_file(self) -> Path:
        return self.local / STATE_FILE

    @property
    def summary_file(self) -> Path:
        """The summary a search writes into its folder when it ends (see report.log_outcome)."""
        return self.local / "summary" / "summary.json"


def locate(settings: SearchSettings) -> SearchLocation:
    """The search folder: --name, the newest <space>-* when resuming, else <space>-<time>."""
    root = storage_uri(settings.storage)
    remote = "://" in root
    if settings.name:
        name = settings.name
        if not settings.resume:
            refuse_existing_search(root, name, remote)
    elif settings.resume:
        name = newest_search(root, settings.space.name, remote)
    else:
        base = f"{settings.space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        name = claim_new_folder(Path("runs").resolve() if remote else Path(root), base)
    uri = f"{root.rstrip('/')}/{name}"
    # With remote storage the driver keeps its own records (MLflow state, summary) under ./runs.
    local = Path("runs").resolve() / name if remote else Path(uri)
    return SearchLocation(uri, local)


def newest_search(root: str, space_name: str, remote: bool) -> str:
    """The newest search of a space that Tune can restore.

    A start that failed (MLflow down, resources refused) leaves a folder without Tune state, which
    must not hide the search before it.
    """
    if remote:
        raise SearchError("--resume with a remote --storage needs --name (the search to continue)")
    candidates = sorted(
        (path for path in Path(root).glob(f"{space_name}-*") if tune.Tuner.can_restore(str(path))),
        key=lambda path: path.stat().st_mtime,
    )
    if not candidates:
        raise SearchError(f"--resume: no earlier search of space {space_name!r} under {root}")
    return candidates[-1].name


def refuse_existing_search(root: str, name: str, remote: bool) -> None:
    """A new search must not write into an earlier one's folder: Tune would mix both experiments'
    state and the MLflow parent run would no longer match the trials under it."""
    uri = f"{root.rstrip('/')}/{name}"
    folder = Path(uri)
    if tune.Tuner.can_restore(uri) or (not remote and folder.is_dir() and any(folder.iterdir())):
        raise SearchError(
            f"a search named {name!r} already exists in {root}; pass --resume to continue it, "
            "or another --name (or none: a new SPACE-TIME name is chosen)"
        )


def claim_new_folder(parent: Path, base: str) -> str:
    """`base`, else `base-2`, `base-3`, ...: the first name whose folder this call creates.

    Default names have one-second resolution; two searches started in the same second into the same
    storage would otherwise share one folder. `mkdir` is atomic, so each gets its own.
    """
    for attempt in range(1, 1000):
        name = base if attempt == 1 else f"{base}-{attempt}"
        try:
            (parent / name).mkdir(parents=True)
        except FileExistsError:
            continue
        except OSError as err:
            raise SearchError(f"storage {parent} is not writable: {err}; pass a writable --storage") from None
        return name
    raise SearchError(f"storage {parent}: no free search name {base}-N; pass --name")


def check_storage_writable(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise SearchError(f"storage {path} is not writable: {err}; pass a writable --storage") from None


# --- the state file ---------------------------------------------------------------------------------
def search_identity(settings: SearchSettings) -> dict[str, Any]:
    """What a resumed search must share with the search it continues, as flat dotted keys: the whole
    space (searched params, fixed settings, scheduler, ...), the data and the MLflow store."""
    identity = {
        "data": str(Path(settings.data_dir).resolve()) if settings.data_dir else "demo",
        "mlflow_uri": comparable_uri(settings.mlflow_uri),
        "experiment": settings.experiment or settings.space.name,
    }
    identity.update(_flatten(settings.space.model_dump(mode="json"), "space"))
    return identity


def comparable_uri(uri: str) -> str:
    """A tracking URI as it names a store: a relative sqlite path is relative to the working directory,
    so `sqlite:///mlflow.db` from another folder is another store (and an absolute one may be the same)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        return {key: item for name, inner in value.items() for key, item in _flatten(inner, f"{prefix}.{name}").items()}
    return {prefix: value}


def read_state(location: SearchLocation) -> dict[str, Any] | None:
    """The state file's content, or None for a search that never got one (a failed start)."""
    if not location.state_file.is_file():
        return None
    return json.loads(location.state_file.read_text())


def write_state(location: SearchLocation, parent_run_id: str, experiment_id: str, settings: SearchSettings) -> None:
    state = {"parent_run_id": parent_run_id, "experiment_id": experiment_id, "search": search_identity(settings)}
    location.state_file.write_text(json.dumps(state, indent=1))


def check_resume_matches(settings: SearchSettings, state: dict[str, Any] | None) -> None:
    """A resumed search goes on with the settings it started with: a changed --set, --data, space or
    MLflow store would mix two searches under one parent run, so it is refused, naming what changed."""
    if not settings.resume or not state or "search" not in state:
        return  # nothing recorded (a search from before identities were kept): nothing to compare
    recorded, now = dict(state["search"]), search_identity(settings)
    # A search recorded before URIs were made comparable kept a relative sqlite path as written.
    recorded["mlflow_uri"] = comparable_uri(str(recorded.get("mlflow_uri", "")))
    changed = sorted(key for key in recorded.keys() | now.keys() if recorded.get(key) != now.get(key))
    if changed:
        shown = "; ".join(f"{key}: {recorded.get(key)!r} then, {now.get(key)!r} now" for key in changed[:6])
        more = f" (and {len(changed) - 6} more)" if len(changed) > 6 else ""
        raise SearchError(
            f"--resume continues a search with the settings it started with, and these differ: {shown}{more}; "
            "resume with the same space, --set, --data and --mlflow-uri, or start a new search"
        )
