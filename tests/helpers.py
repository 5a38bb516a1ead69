"""Helpers shared by several test files: a generated noise painting and running the search CLI with
small settings. A plain module, not a test file: pytest collects nothing here (the shared fixtures,
such as `mlflow_uri`, are in conftest.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prado_dist.tune import main as tune_main


def noise_image(path: Path, size: tuple[int, int], seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def run_tune(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = tune_main(argv)
    return code, capsys.readouterr().err


def search_args(data: Path, tmp_path: Path, mlflow_uri: str, *extra: str) -> list[str]:
    return [
        "--space", "demo", "--data", str(data), "--storage", str(tmp_path / "runs"), "--mlflow-uri", mlflow_uri,
        "--set", "image_size=32", "--set", "epochs=1", *extra,
    ]  # fmt: skip
