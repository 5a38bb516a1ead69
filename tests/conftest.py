"""Shared fixtures: an isolated cache folder, a small generated dataset, an MLflow store, local Ray clusters."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SHARED_PAINTINGS = Path(__file__).resolve().parents[2] / "shared" / "data" / "paintings-dev"


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test writes decoded caches and demo sets under a temporary folder, never ~/.cache."""
    path = tmp_path_factory.mktemp("prado_cache")
    os.environ["PRADO_DIST_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 300-image generated dataset in the Kaggle layout (64 px source images)."""
    from prado_dist.data.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "prado", images=300, seed=1, size=64)


@contextlib.contextmanager
def local_ray(num_cpus: int) -> Iterator[str]:
    """A local Ray instance with `num_cpus` logical CPUs in its own temp dir; shut down afterwards.

    Tests that start Ray never run in parallel with each other (pytest runs them in one process),
    and the private temp dir keeps them apart from any other Ray instance on the machine.
    """
    import ray

    from prado_dist.distributed.resources import local_ray_init_kwargs

    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = temp_dir
    ray.init(**{**local_ray_init_kwargs(num_cpus), "log_to_driver": False}, _temp_dir=temp_dir)
    try:
        yield temp_dir
    finally:
        ray.shutdown()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite store for the module: creating its tables costs seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 backed by a sqlite file; yields its URI."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{root}/mlflow.db",
        "--default-artifact-root",
        str(root / "art"),
        "--workers",
        "1",
    ]
    log = open(root / "server.log", "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    import urllib.request

    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                output = (root / "server.log").read_text()[-2000:]
                raise RuntimeError(f"mlflow server did not start: {output}") from None
            time.sleep(0.5)
    yield uri
    os.killpg(process.pid, 15)
    process.wait(timeout=30)
    log.close()
