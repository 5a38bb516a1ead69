"""`python -m prado_dist.predict`: painter probabilities from the model a search logs to MLflow."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch

from prado_dist import predict
from prado_dist.config import TrainConfig
from prado_dist.data import prepare_data
from prado_dist.data.decode import decode_image
from prado_dist.engine import TrainingRun
from prado_dist.engine.export import PaintingClassifier
from prado_dist.search.report import log_best_model


def test_predict_prints_each_images_probabilities(
    small_demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = prepare_data(small_demo, 32, cache_dir=tmp_path / "cache")
    config = TrainConfig().with_overrides(
        # On the CPU, as the reference classifier below (on a GPU machine "auto" would train on the GPU).
        {"model": "mobilenet", "image_size": 32, "bn_momentum": 0.3, "data_dir": small_demo, "device": "cpu"}
    )
    torch.manual_seed(0)
    run = TrainingRun(config, data)
    monkeypatch.chdir(tmp_path)  # a sqlite tracking URI keeps artifacts in ./mlruns
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run() as parent:
        run_id = parent.info.run_id
    # What a search logs at its end: the best checkpoint, as a model that normalises its own input.
    log_best_model(uri, run_id, SimpleNamespace(best_state=run.state_dict(epoch=0)), data)

    # Loading the exported program needs torch, not prado_dist's code.
    requirements = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model/requirements.txt")).read_text()
    assert "torch==" in requirements and "prado" not in requirements

    images = sorted(small_demo.rglob("*.jpg"))[:3]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    status = predict.main(["--run-id", run_id, "--mlflow-uri", uri, "--json", *map(str, images), str(broken)])
    printed = capsys.readouterr()
    assert status == 1  # one image could not be read; the others were still classified
    assert "broken.jpg: skipped" in printed.err
    lines = [json.loads(line) for line in printed.out.splitlines()]
    assert [line["image"] for line in lines] == [str(path) for path in images]

    classifier = PaintingClassifier(run.network, run.image_pipeline, data.classes, image_size=32)
    for line, path in zip(lines, images, strict=True):
        probabilities = line["probabilities"]
        assert list(probabilities.values()) == sorted(probabilities.values(), reverse=True)  # most likely first
        pixels = torch.from_numpy(np.ascontiguousarray(decode_image(path, 32).transpose(2, 0, 1)))[None].float()
        expected = classifier(pixels)[0].tolist()
        assert [probabilities[name] for name in data.classes] == pytest.approx(expected, abs=1e-5)

    assert predict.main(["--run-id", "0" * 32, "--mlflow-uri", uri, str(images[0])]) == 2
    assert "cannot load model" in capsys.readouterr().err


def test_logged_model_passes_mlflows_input_check_on_a_gpu_machine(
    small_demo: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Seen on an H100: with a GPU present, MLflow checks the input example by loading the exported
    # program on the GPU, which its CPU weights cannot move to, and warns that the check failed.
    data = prepare_data(small_demo, 32, cache_dir=tmp_path / "cache")
    config = TrainConfig().with_overrides(
        {"model": "mobilenet", "image_size": 32, "data_dir": small_demo, "device": "cpu"}
    )
    run = TrainingRun(config, data)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run() as parent:
        run_id = parent.info.run_id
    log_best_model(uri, run_id, SimpleNamespace(best_state=run.state_dict(epoch=0)), data)
    assert "Failed to validate serving input example" not in capfd.readouterr().err
    # Whoever serves it on a GPU machine through pyfunc loads it on the CPU likewise (README).
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model", model_config={"device": "cpu"})
    pixels = data.images[data.splits["test"][:3]].transpose(0, 3, 1, 2).astype(np.float32)
    assert np.asarray(model.predict(pixels)).shape == (3, len(data.classes))
