"""A search's record when it ends: the summary file and figures in its folder, and on the MLflow
parent run the best configuration, the test metrics, the same files and the best model."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator

import mlflow
import torch
from mlflow.entities import Metric, Param, RunTag
from mlflow.environment_variables import MLFLOW_DEFAULT_PREDICTION_DEVICE
from mlflow.models import infer_signature
from mlflow.models.model import ModelInfo

from prado_dist.data import PreparedData
from prado_dist.engine.export import classifier_from_checkpoint
from prado_dist.engine.reporting import plot_confusion, write_confusion_csv
from prado_dist.search.plots import parameter_axes, plot_importances, plot_parameter_effects, plot_trial_curves
from prado_dist.search.results import SearchOutcome
from prado_dist.search.space import SearchSpace
from prado_dist.search.storage import SearchLocation

logger = logging.getLogger(__name__)


def write_summary(outcome: SearchOutcome, data: PreparedData, location: SearchLocation, space: SearchSpace) -> None:
    """summary.json, the test confusion matrix (png and csv), the trials' curves and parameter effects."""
    artifacts = location.summary_file.parent
    artifacts.mkdir(exist_ok=True)
    title = f"best trial {outcome.best_trial_id}: test split"
    plot_confusion(outcome.confusion, data.classes, artifacts / "test_confusion_matrix.png", title=title)
    write_confusion_csv(outcome.confusion, data.classes, artifacts / "test_confusion_matrix.csv")
    curves = {trial_id: trial["curve"] for trial_id, trial in outcome.trials.items()}
    plot_trial_curves(curves, space.metric, artifacts / "trial_curves.png", highlight=[outcome.best_trial_id])
    plot_parameter_effects(
        outcome.trials, parameter_axes(space), space.metric, artifacts / "parameter_effects.png", outcome.best_trial_id
    )
    if outcome.importances:
        plot_importances(outcome.importances, outcome.importance_note, artifacts / "parameter_importances.png")
    summary = {
        "best_trial": outcome.best_trial_id,
        "best_config": outcome.best_config,
        "best_val": outcome.best_val,
        "test": outcome.test,
        "baseline_val": outcome.baseline_val,
        "importances": {"values": outcome.importances, "note": outcome.importance_note},
        "trials": outcome.trials,
    }
    location.summary_file.write_text(json.dumps(summary, indent=2, default=str))


def log_outcome(
    client,
    outcome: SearchOutcome,
    data: PreparedData,
    location: SearchLocation,
    space: SearchSpace,
    register_as: str | None = None,
) -> None:
    """The summary, then on the parent run: best config and metrics, test metrics, files, the model
    (registered in the Model Registry as a new version of `register_as`, when given)."""
    write_summary(outcome, data, location, space)
    now = int(time.time() * 1000)
    metrics = [Metric(f"best_{k}", v, now, 0) for k, v in outcome.best_val.items()]
    metrics += [Metric(k, float(v), now, 0) for k, v in outcome.test.items()]
    if outcome.baseline_val is not None:
        metrics.append(Metric(f"baseline_{space.metric}", float(outcome.baseline_val), now, 0))
    metrics += [Metric(f"importance.{name}", value, now, 0) for name, value in outcome.importances.items()]
    params = [Param(f"best.{k}", str(v)) for k, v in outcome.best_config.items()]
    params.append(Param("best.trial_id", outcome.best_trial_id))
    run_id = outcome.parent_run_id
    try:
        tags = [RunTag("best_trial_id", outcome.best_trial_id), RunTag("importance_note", outcome.importance_note)]
        client.log_batch(run_id, metrics=metrics, params=params, tags=tags)
        client.log_artifacts(run_id, str(location.summary_file.parent))
        model = log_best_model(client.tracking_uri, run_id, outcome, data)
        if register_as:
            register_best_model(model.model_uri, register_as, outcome, location)
        client.set_terminated(run_id, status="FINISHED")
    except Exception as err:
        logger.warning(
            "could not record the search summary in MLflow (%s); it is in %s", err, location.summary_file.parent
        )


def log_best_model(uri: str, run_id: str, outcome: SearchOutcome, data: PreparedData) -> ModelInfo:
    """The best checkpoint as an MLflow PyTorch model with an input signature (see predict.py)."""
    classifier = classifier_from_checkpoint(outcome.best_state, data)
    # MLflow 3 saves the model with torch.export ("pt2"), which fixes a dimension of size 1: an example
    # of 2 images keeps the batch dimension dynamic, so the logged model takes any number of images.
    example = torch.from_numpy(data.images[data.splits["test"][:2]].transpose(0, 3, 1, 2).copy()).float()
    signature = infer_signature(example.numpy(), classifier(example).numpy())
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id), _checked_on_cpu():
        return mlflow.pytorch.log_model(
            classifier,
            name="model",
            signature=signature,
            input_example=example.numpy(),
            # The exported program needs only torch to load. Stating it skips MLflow's inference
            # of requirements, a subprocess that re-imports the model: 6-7 s of every search here.
            pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
            metadata={"classes": list(data.classes), "image_size": classifier.image_size},
        )


def register_best_model(model_uri: str, name: str, outcome: SearchOutcome, location: SearchLocation) -> None:
    """A new version of registered model `name`: the search's best model, tagged with where it came from."""
    version = mlflow.register_model(
        model_uri,
        name,
        tags={
            "search": location.name,
            "search_parent_run_id": outcome.parent_run_id,
            "best_trial_id": outcome.best_trial_id,
            **{key: f"{outcome.test[key]:.4f}" for key in ("test_accuracy", "test_balanced_accuracy", "test_macro_f1")},
        },
    )
    print(f"Registered the best model as {name!r} version {version.version}", flush=True)


@contextlib.contextmanager
def _checked_on_cpu() -> Iterator[None]:
    """The exported program holds CPU weights, which torch.export cannot move; MLflow checks the input
    example by loading the model on the GPU when there is one, and fails. Checked on the CPU instead
    (unless the user chose a device), and the environment put back as it was."""
    name = MLFLOW_DEFAULT_PREDICTION_DEVICE.name
    before = os.environ.get(name)
    os.environ[name] = before or "cpu"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before
