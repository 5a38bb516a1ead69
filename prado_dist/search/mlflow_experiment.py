"""The MLflow experiment a search is recorded in: connecting to it, what describes the search
(the code's commit, the data as a dataset input), and the UI page where a person opens its runs.

The runs themselves (a parent per search, a child per trial) are written by tracking.py.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from prado_dist.data import PreparedData, split_counts


class TrackingError(RuntimeError):
    """The MLflow tracking server cannot be used."""


def connect(uri: str, experiment: str) -> tuple[MlflowClient, str]:
    """A client and the experiment id; fails fast, naming the URI and the cause."""
    # A search must not stall for minutes inside MLflow's own retries when the server is gone
    # (MLflow reads these on each request; a user's own values are kept).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        client = MlflowClient(tracking_uri=uri)  # an unsupported URI scheme already fails here
        experiment_id = _experiment_id(client, experiment)
        # MLflow 3's UI opens an untagged experiment on its GenAI overview, not on the training runs.
        client.set_experiment_tag(experiment_id, "mlflow.experimentKind", "custom_model_development")
    except TrackingError:
        raise
    except Exception as err:
        raise TrackingError(
            f"cannot use the MLflow tracking server at {uri!r}: {type(err).__name__}: {str(err)[:300]}. "
            "Start it (e.g. `mlflow server --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1`) or pass "
            "another --mlflow-uri."
        ) from None
    return client, experiment_id


def _experiment_id(client: MlflowClient, experiment: str) -> str:
    found = client.get_experiment_by_name(experiment)
    if found and found.lifecycle_stage == "deleted":
        # MLflow keeps a deleted experiment's name, and refuses new runs in it (issue 21, item 5).
        raise TrackingError(
            f"MLflow experiment {experiment!r} (id {found.experiment_id}) in {client.tracking_uri} was deleted; "
            f"restore it (mlflow experiments restore --experiment-id {found.experiment_id}) or pass another "
            "--experiment"
        )
    if found:
        return found.experiment_id
    try:
        return client.create_experiment(experiment)
    except Exception:
        # Two searches starting at once: the other one created it between our lookup and create.
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise
        return found.experiment_id


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` listens by default


def experiment_page(server: str, experiment_id: str) -> str:
    """The UI page of an experiment's training runs. MLflow 3.17's UI opens every experiment in its
    GenAI workspace (traces, "Traces 0"), whatever its experimentKind tag says; `workflowType` opens
    the runs table instead (checked in a headless browser: bench/mlflow_page.py, its screenshot)."""
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


def how_to_open(mlflow_uri: str, experiment_id: str) -> str:
    """Where a person looks at the recorded runs: the experiment's page on the server, or `mlflow ui`
    on the store and then that page."""
    if mlflow_uri.startswith(("http://", "https://")):
        return f"open {experiment_page(mlflow_uri, experiment_id)}"
    return f"open with: mlflow ui --backend-store-uri {mlflow_uri}, then {experiment_page(LOCAL_UI, experiment_id)}"


def dataset_input(data: PreparedData, data_dir: Path | None) -> DatasetInput:
    """The search's data as an MLflow dataset input: the runs table's Dataset column shows it, and its
    profile holds the images per painter in each split. The digest is the decode cache's fingerprint."""
    source = str(Path(data_dir).resolve()) if data_dir else "generated demo paintings"
    counts = split_counts(data)
    profile = {
        "num_images": int(len(data.labels)),
        "image_size": data.image_size,
        "classes": list(data.classes),
        **{f"{split}_per_class": counts[split] for split in counts},
    }
    dataset = Dataset(
        name=Path(data_dir).name if data_dir else "demo",
        digest=data.fingerprint[:16],
        source_type="local",
        source=json.dumps({"uri": source}),
        profile=json.dumps(profile),
    )
    return DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, "train/validation/test")])
