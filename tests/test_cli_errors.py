"""The search and train CLIs refuse a bad input with exit 2 and one `error:` line naming what was
wrong and what is accepted, before Ray is started (search) or any image decoded (train): bad search
settings, a bad data folder, unwritable storage, an unreachable MLflow or Ray address, bad train
settings. None of these tests starts Ray.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import ray

from prado_dist.data import cache as cache_module
from prado_dist.search import check_search, known_spaces, load_space
from prado_dist.train import main as train_main
from tests.conftest import free_port
from tests.helpers import noise_image, run_tune, search_args

# --- the search CLI: refused before Ray starts ------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--space", "no_such_space"], ["unknown search space 'no_such_space'", "known spaces", "demo"]),
        (["--space", "demo", "--set", "model=alexnet"], ["unknown model 'alexnet'", "known models", "resnet29"]),
        (["--space", "demo", "--set", "epochs=0"], ["epochs", "greater than or equal to 1", "(got 0)"]),
        (["--space", "demo", "--set", "batch_size=-1"], ["batch_size", "greater than or equal to 1", "(got -1)"]),
        (["--space", "demo", "--set", "lr=fast"], ["lr", "valid number", "'fast'"]),
        (["--space", "demo", "--set", "colour=red"], ["--set colour: unknown setting", "training setting"]),
        (["--space", "demo", "--set", "epochs"], ["--set expects key=value", "'epochs'"]),
        (["--space", "demo", "--workers-per-trial", "0"], ["trial.workers", "greater than or equal to 1"]),
        (["--space", "demo", "--cpus-per-worker", "0"], ["trial.cpus_per_worker", "greater than 0"]),
        (["--space", "demo", "--gpus-per-worker", "-1"], ["trial.gpus_per_worker", "greater than or equal to 0"]),
        (["--space", "demo", "--num-samples", "0"], ["num_samples", "greater than or equal to 1"]),
        (["--space", "demo", "--max-concurrent", "0"], ["max_concurrent", "greater than or equal to 1"]),
        (["--space", "vgg19", "--set", "pretrained=package"], ["no package ships weights of vgg19", "lite0"]),
    ],
    ids=[
        "unknown-space", "unknown-model", "epochs-0", "batch-negative", "lr-not-a-number", "unknown-key",
        "set-without-value", "workers-0", "cpus-0", "gpus-negative", "num-samples-0", "max-concurrent-0",
        "package-without-weights",
    ],
)  # fmt: skip
def test_bad_search_settings_exit_2_before_ray(
    argv: list[str], expected: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_tune(argv, capsys)
    assert code == 2 and err.startswith("error: ")
    for text in expected:
        assert text in err
    # The whole space dict used to follow a whole-space check's message ("(got {'model': ...})").
    assert "(got {" not in err and "Value error" not in err
    assert not ray.is_initialized()


@pytest.mark.parametrize("name", known_spaces())
def test_every_shipped_space_passes_the_drivers_checks(name: str) -> None:
    # lite0's pretrained=package was refused as a missing file until the check knew packaged weights.
    check_search(load_space(name))


def kaggle_csv(root: Path, header: str, line: str) -> Path:
    root.mkdir(parents=True)
    (root / "prado.csv").write_text(f"{header}\n{line}\n", encoding="utf-8")
    noise_image(root / "images" / "a.jpg", (8, 8), seed=0)
    return root


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda root: root, ["does not exist"]),
        (lambda root: root.mkdir() or root, ["is empty", "prado.csv", "one subfolder of images per class"]),
        (
            lambda root: kaggle_csv(root, "author,title", "Goya y Lucientes; Francisco de,x"),
            ["lacks the column(s) ['work_image_url']", "expected the Kaggle prado.csv"],
        ),
        (
            lambda root: kaggle_csv(root, "author,work_image_url", "Velázquez,https://x/a.jpg"),
            ["none of the five painters", "Goya y Lucientes, Francisco de"],
        ),
    ],
    ids=["missing", "empty-folder", "csv-without-columns", "csv-without-painters"],
)
def test_bad_data_folder_exits_2_before_ray(
    make, expected: list[str], tmp_path: Path, mlflow_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make(tmp_path / "data")
    code, err = run_tune(search_args(data, tmp_path, mlflow_uri), capsys)
    assert code == 2
    assert str(data) in err or "prado.csv" in err
    for text in expected:
        assert text in err
    assert not ray.is_initialized()


def test_unwritable_storage_exits_2(small_demo: Path, tmp_path: Path, mlflow_uri: str, capsys) -> None:
    # Tests run as root, which chmod does not stop: a path below a regular file cannot be created.
    (tmp_path / "file.txt").write_text("not a folder")
    argv = search_args(small_demo, tmp_path, mlflow_uri)
    argv[argv.index("--storage") + 1] = str(tmp_path / "file.txt" / "sub")
    code, err = run_tune(argv, capsys)
    assert code == 2
    assert "file.txt/sub" in err and "not writable" in err and "pass a writable --storage" in err
    assert not ray.is_initialized()


def hung_server() -> socket.socket:
    """A port that accepts connections and never answers (a hung server, not a refused port)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    return server


@pytest.mark.parametrize("kind", ["refused", "hung", "bad-scheme"])
def test_unreachable_mlflow_fails_fast_naming_the_uri(
    kind: str, small_demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = hung_server() if kind == "hung" else None
    uri = {
        "refused": f"http://127.0.0.1:{free_port()}",
        "hung": f"http://127.0.0.1:{server.getsockname()[1] if server else 0}",
        "bad-scheme": "mlfow://127.0.0.1:5000",
    }[kind]
    started = time.monotonic()
    try:
        code, err = run_tune(search_args(small_demo, tmp_path, uri), capsys)
    finally:
        if server is not None:
            server.close()
    # Measured: refused and bad scheme at once; hung 20 s (MLFLOW_HTTP_REQUEST_TIMEOUT 10 s, 1 retry).
    assert time.monotonic() - started < 30
    assert code == 2
    assert f"cannot use the MLflow tracking server at {uri!r}" in err and "--mlflow-uri" in err
    assert not ray.is_initialized()


def test_unreachable_ray_address_fails_fast(small_demo: Path, tmp_path: Path, mlflow_uri: str, capsys) -> None:
    # ray.init(address=...) alone kept retrying the GCS for more than 4 minutes (measured).
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    code, err = run_tune(search_args(small_demo, tmp_path, mlflow_uri, "--address", address), capsys)
    assert time.monotonic() - started < 60  # mostly the data and MLflow checks that come first
    assert code == 2
    assert f"cannot connect to the Ray cluster at {address!r}" in err and "ray start --head" in err
    assert not ray.is_initialized()


# --- the train CLI ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--model", "alexnet"], ["--model: unknown model 'alexnet'", "known models", "resnet29"]),
        (["--epochs", "0"], ["epochs", "greater than or equal to 1"]),
        (["--workers", "0"], ["workers must be >= 1, got 0"]),
        (["--data", "{tmp}/nowhere"], ["does not exist"]),
    ],
    ids=["unknown-model", "epochs-0", "workers-0", "missing-data"],
)
def test_bad_train_settings_exit_2_before_decoding(
    argv: list[str], expected: list[str], small_demo: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    decoded: list[Path] = []
    monkeypatch.setattr(cache_module, "decode_image", lambda path, size: decoded.append(path))
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    data = [] if "--data" in argv else ["--data", str(small_demo)]
    code = train_main([*argv, *data, "--image-size", "40", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ")
    for text in expected:
        assert text in err
    assert decoded == [] and not (tmp_path / "out").exists()
    assert not ray.is_initialized()
