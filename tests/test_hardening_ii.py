"""Hardening II (issue 21): inputs that used to end in a traceback, or fail only inside Ray trials,
now end with exit 2 and one `error:` line saying what was wrong and what to do, before any image is
decoded or Ray started wherever that can be known then.

Each test here failed on the code before issue 21. None starts Ray.
"""

from __future__ import annotations

import argparse
import csv
import errno
import json
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from prado_dist.data import cache as cache_module
from prado_dist.data import decode as decode_module
from prado_dist.data import fetch
from prado_dist.data.__main__ import main as data_main
from prado_dist.data.sources import PRADO_AUTHORS
from prado_dist.search import load_space
from prado_dist.train import main as train_main
from prado_dist.tune import main as tune_main
from tests.helpers import noise_image  # the same generated painting as the first round's tests

SIZE = 16


def painters(root: Path, good: dict[str, int], junk: dict[str, int] | None = None) -> Path:
    """Folder-per-class data: `good[name]` decodable images and `junk[name]` undecodable files."""
    for label, (name, count) in enumerate(good.items()):
        for index in range(count):
            noise_image(root / name / f"{index}.png", (20, 14), seed=10 * label + index)
        for index in range((junk or {}).get(name, 0)):
            (root / name / f"junk{index}.jpg").write_bytes(b"not a jpeg")
    return root


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files decoded during a test (recorded; decoding still happens)."""
    calls: list[Path] = []
    original = cache_module.decode_image

    def recording(path: Path, image_size: int) -> np.ndarray:
        calls.append(Path(path))
        return original(path, image_size)

    monkeypatch.setattr(cache_module, "decode_image", recording)
    return calls


def run_tune(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = tune_main(argv)
    err = capsys.readouterr().err
    assert not ray.is_initialized()
    return code, err


def search_args(data: Path, tmp_path: Path, mlflow_uri: str, *extra: str) -> list[str]:
    return [
        "--space", "demo", "--data", str(data), "--storage", str(tmp_path / "runs"), "--mlflow-uri", mlflow_uri,
        "--set", "image_size=32", "--set", "epochs=1", *extra,
    ]  # fmt: skip


def space_file(tmp_path: Path, params: str, fixed: str = "epochs: 2") -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(f"model: mobilenet\nfixed:\n  {fixed}\nparams:\n{params}\n")
    return path


# --- item 5: tracebacks that are now exit 2 ---------------------------------------------------------


def test_set_value_that_is_not_yaml_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_tune(["--space", "demo", "--set", "lr=[1"], capsys)
    assert code == 2 and err.startswith("error: --set 'lr=[1': the value is not valid YAML")
    assert "Traceback" not in err


def test_class_with_too_few_files_is_refused_before_decoding(
    tmp_path: Path, mlflow_uri: str, decoded: list[Path], capsys
) -> None:
    data = painters(tmp_path / "data", {"bosch": 5, "greco": 2})
    code, err = run_tune(search_args(data, tmp_path, mlflow_uri), capsys)
    assert code == 2 and "error: class(es) {'greco': 2}" in err and "fewer than 3 usable images" in err
    assert decoded == []


def test_class_with_too_few_decodable_images_exits_2(
    tmp_path: Path, mlflow_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data = painters(tmp_path / "data", {"bosch": 5, "greco": 2}, junk={"greco": 2})
    code, err = run_tune(search_args(data, tmp_path, mlflow_uri), capsys)
    assert code == 2 and "error: class(es) {'greco': 2}" in err
    assert "2 file(s) could not be decoded" in err


def test_deleted_mlflow_experiment_is_named_with_how_to_restore(
    small_demo: Path, tmp_path: Path, mlflow_uri: str, decoded: list[Path], capsys
) -> None:
    client = MlflowClient(tracking_uri=mlflow_uri)
    experiment_id = client.create_experiment("gone")
    client.delete_experiment(experiment_id)
    code, err = run_tune(search_args(small_demo, tmp_path, mlflow_uri, "--experiment", "gone"), capsys)
    assert code == 2
    assert f"MLflow experiment 'gone' (id {experiment_id})" in err and "was deleted" in err
    assert f"mlflow experiments restore --experiment-id {experiment_id}" in err
    assert decoded == []


# --- item 7: settings that define the data cannot be searched ---------------------------------------


@pytest.mark.parametrize(
    ("key", "spec", "why"),
    [
        ("image_size", "{distribution: choice, values: [64, 224]}", "tested on the driver's images"),
        ("split_seed", "{distribution: randint, low: 0, high: 9}", "driver's test split"),
        ("test_fraction", "{distribution: uniform, low: 0.1, high: 0.3}", "driver's test split"),
        ("val_fraction", "{distribution: uniform, low: 0.1, high: 0.3}", "one validation split"),
    ],
)
def test_data_defining_settings_are_refused_as_search_parameters(
    key: str, spec: str, why: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = space_file(tmp_path, f"  lr: {{distribution: loguniform, low: 1.0e-4, high: 1.0e-2}}\n  {key}: {spec}")
    code, err = run_tune(["--space", str(path)], capsys)
    assert code == 2 and f"cannot search {key} (" in err and why in err
    assert "set it once for the whole search" in err


# --- item 6 (the part that belongs to the space): every value a distribution draws is valid ----------


@pytest.mark.parametrize(
    ("param", "bad"),
    [
        ("flip_prob: {distribution: uniform, low: 0.0, high: 1.5}", "1.5"),
        ("label_smoothing: {distribution: uniform, low: 0.0, high: 1.0}", "1.0"),
        ("decay_start: {distribution: randint, low: -2, high: 5}", "-2"),
        ("dropout: {distribution: choice, values: [0.0, 0.5, 1.2]}", "1.2"),
        ("weight_decay: {distribution: uniform, low: -0.1, high: 0.1}", "-0.1"),
    ],
)
def test_searched_range_valid_only_at_its_baseline_is_refused(param: str, bad: str, tmp_path: Path, capsys) -> None:
    code, err = run_tune(["--space", str(space_file(tmp_path, f"  {param}"))], capsys)
    key = param.split(":")[0]
    assert code == 2 and f"{key}: the searched range" in err and f"reaches {bad}" in err
    assert "narrow the range" in err


def test_every_shipped_space_draws_only_valid_settings() -> None:
    for name in ("demo", "mobilenet", "resnet29", "vgg", "efficientnet_b3", "mobilenetv2", "resnet50v2", "vgg19"):
        assert load_space(name).params


# --- item 8: a device that cannot be used ------------------------------------------------------------


@pytest.mark.parametrize("extra", [[], ["--single-process"]], ids=["ray", "single-process"])
@pytest.mark.parametrize("device", ["gpu", "cuda", "cuda:1"])
def test_unusable_device_is_refused_before_decoding(
    device: str, extra: list[str], small_demo: Path, tmp_path: Path, decoded: list[Path], capsys
) -> None:
    if device != "gpu" and torch.cuda.device_count() > int(device.partition(":")[2] or 0):
        pytest.skip("this machine has that GPU")
    argv = ["--device", device, "--data", str(small_demo), "--epochs", "1", "--out", str(tmp_path / "out"), *extra]
    code = train_main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: device {device!r}")
    assert ("not a PyTorch device" in err) if device == "gpu" else ("CUDA is not available" in err)
    assert decoded == [] and not ray.is_initialized() and not (tmp_path / "out").exists()


# --- item 9 and 12: data fetch --------------------------------------------------------------------


def painter_csv(path: Path, urls: list[str]) -> Path:
    authors = list(PRADO_AUTHORS.values())
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, ["author", "work_image_url"])
        writer.writeheader()
        writer.writerows({"author": authors[i % 5], "work_image_url": url} for i, url in enumerate(urls))
    return path


def run_fetch(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = data_main(["fetch", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_fetch_missing_csv_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_fetch(["--csv", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and err.startswith("error: metadata csv not found") and "missing.csv" in err


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--concurrency", "0", "--concurrency must be at least 1, got 0"),
        ("--retries", "-1", "--retries must be 0 or more"),
        ("--timeout", "0", "--timeout must be > 0"),
    ],
)
def test_fetch_bad_flags_exit_2(flag: str, value: str, expected: str, tmp_path: Path, capsys) -> None:
    csv_path = painter_csv(tmp_path / "prado.csv", ["https://example.invalid/a.jpg"])
    code, _, err = run_fetch(["--csv", str(csv_path), "--out", str(tmp_path / "out"), flag, value], capsys)
    assert code == 2 and err.startswith(f"error: {expected}")


def test_fetch_csv_that_is_not_prado_csv_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    code, _, err = run_fetch(["--csv", str(tmp_path / "other.csv"), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "lacks the column(s) ['author', 'work_image_url']" in err


@pytest.mark.parametrize("url", ["file:///etc/hostname", "ftp://example.invalid/a.jpg", "data:,x", "/etc/passwd"])
def test_fetch_only_follows_http_urls(url: str, tmp_path: Path, monkeypatch, capsys) -> None:
    attempts: list[str] = []
    monkeypatch.setattr(fetch, "_download_once", lambda url, *args: attempts.append(url))
    csv_path = painter_csv(tmp_path / "prado.csv", [url])
    code, out, _ = run_fetch(["--csv", str(csv_path), "--out", str(tmp_path / "out")], capsys)
    assert code == 1 and attempts == []
    assert f"FAILED {url}: only http/https URLs are fetched" in out
    assert list((tmp_path / "out" / "images").iterdir()) == []


def test_fetch_refuses_a_redirect_to_another_scheme() -> None:
    handler = fetch._WebOnlyRedirects()
    with pytest.raises(fetch._PermanentError, match="redirected to 'ftp://x/y'"):
        handler.redirect_request(None, None, 302, "Found", {}, "ftp://x/y")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EDQUOT])
def test_fetch_full_disk_stops_at_once_without_retrying(code: int, tmp_path: Path, monkeypatch, capsys) -> None:
    attempts: list[str] = []

    def disk_error(url: str, destination: Path, *args) -> None:
        attempts.append(url)
        raise OSError(code, "disk says no", str(destination) + ".part")

    monkeypatch.setattr(fetch, "_download_once", disk_error)
    urls = [f"https://example.invalid/{index}.jpg" for index in range(20)]
    csv_path = painter_csv(tmp_path / "prado.csv", urls)
    argv = ["--csv", str(csv_path), "--out", str(tmp_path / "out"), "--concurrency", "1", "--backoff", "0"]
    exit_code, _, err = run_fetch(argv, capsys)
    assert exit_code == 2 and attempts == urls[:1]  # one attempt, then the run stops
    assert err.startswith(f"error: cannot write {tmp_path / 'out' / 'images' / '0.jpg.part'}: disk says no")
    assert "rerun the same command" in err


def test_fetch_transient_os_error_is_still_retried(tmp_path: Path, monkeypatch) -> None:
    attempts: list[str] = []

    def flaky(url: str, *args) -> None:
        attempts.append(url)
        raise OSError(errno.ECONNRESET, "reset")

    monkeypatch.setattr(fetch, "_download_once", flaky)
    csv_path = painter_csv(tmp_path / "prado.csv", ["https://example.invalid/a.jpg"])
    args = argparse.Namespace(csv=csv_path, out=tmp_path / "out", concurrency=1, retries=2, timeout=1.0, backoff=0.0)
    assert fetch.main(args) == 1 and len(attempts) == 3


# --- item 6: what used to fail only inside trials, checked on the driver (search/preflight.py) --------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--workers-per-trial", "3"], ["global batch size 32 does not split evenly over 3 workers", "30 or 33"]),
        (["--set", "pretrained=/missing.safetensors"], ["pretrained=/missing.safetensors: no such file"]),
        (["--set", "model=timm:typo"], ["timm has no model 'typo'", "timm.list_models()"]),
        (
            ["--set", "model=timm:resnet18", "--set", "pretrained=/tmp"],
            ["pretrained=/tmp: no such file (it is a folder)"],
        ),
    ],
    ids=["workers-vs-batch", "missing-pretrained", "timm-typo", "pretrained-folder"],
)
def test_settings_that_fail_every_trial_exit_2_before_decoding(
    argv: list[str], expected: list[str], small_demo: Path, tmp_path: Path, mlflow_uri: str, decoded, capsys
) -> None:
    code, err = run_tune(search_args(small_demo, tmp_path, mlflow_uri, *argv), capsys)
    assert code == 2 and err.startswith("error: ")
    for text in expected:
        assert text in err
    assert decoded == [] and not (tmp_path / "runs").exists()  # nor a search folder, nor a parent run


def test_searched_batch_sizes_must_split_over_the_workers(tmp_path: Path, capsys) -> None:
    path = space_file(tmp_path, "  batch_size: {distribution: choice, values: [32, 48]}", fixed="image_size: 32")
    code, err = run_tune(["--space", str(path), "--workers-per-trial", "3"], capsys)
    assert code == 2 and "batch_size: the searched {'values': [32, 48]} draws 32" in err
    code, err = run_tune(["--space", str(path), "--workers-per-trial", "2", "--storage", "/proc/x"], capsys)
    assert code == 2 and "batch_size" not in err  # 32 and 48 split over 2: the next check (storage) speaks


def test_train_refuses_an_unknown_timm_model_before_decoding(small_demo: Path, tmp_path: Path, decoded, capsys) -> None:
    code = train_main(["--model", "timm:resnet_typo", "--data", str(small_demo), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "--model: timm has no model 'resnet_typo'" in err and "similar: ['" in err
    assert decoded == []


# --- item 2: train into an existing --out ------------------------------------------------------------


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--single-process", "--model", "mobilenet", "--data", str(data), "--image-size", "32", "--epochs", "2",
        "--batch-size", "4", "--set", "bn_recalibration_images=null", "--out", str(out), *extra,
    ]  # fmt: skip


@pytest.fixture
def interrupted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, list[dict]]:
    """A 2-epoch single-process run stopped by Ctrl-C during its second epoch: (data, out, history)."""
    from prado_dist.engine import TrainingRun

    data = painters(tmp_path / "data", {"bosch": 6, "greco": 6})
    original = TrainingRun.run_epoch

    def interrupt_second(self, epoch: int):
        if epoch == 1:
            raise KeyboardInterrupt
        return original(self, epoch)

    with monkeypatch.context() as patch:
        patch.setattr(TrainingRun, "run_epoch", interrupt_second)
        with pytest.raises(KeyboardInterrupt):
            train_main(train_args(data, tmp_path / "out"))
    history = torch.load(tmp_path / "out" / "last.pt", weights_only=False)["history"]
    return data, tmp_path / "out", history


def test_train_into_an_existing_out_is_refused(interrupted_run, decoded: list[Path], capsys) -> None:
    data, out, _ = interrupted_run
    before = sorted(path.name for path in out.iterdir())
    assert train_main(train_args(data, out)) == 2
    err = capsys.readouterr().err
    assert f"error: --out {out} already holds files" in err and "--resume" in err
    assert decoded == [] and sorted(path.name for path in out.iterdir()) == before


def test_resume_with_other_settings_names_what_changed(interrupted_run, decoded: list[Path], capsys) -> None:
    data, out, _ = interrupted_run
    assert train_main(train_args(data, out, "--resume", "--lr", "0.01")) == 2
    err = capsys.readouterr().err
    assert "other settings (lr 0.001 -> 0.01)" in err and decoded == []


def test_resume_on_other_data_is_refused(interrupted_run, capsys) -> None:
    data, out, _ = interrupted_run
    noise_image(data / "greco" / "0.png", (20, 14), seed=999)  # same folder, one painting replaced
    assert train_main(train_args(data, out, "--resume")) == 2
    assert "trained on other data" in capsys.readouterr().err


def test_resume_continues_and_a_finished_run_is_not_resumed(interrupted_run, capsys) -> None:
    data, out, history = interrupted_run
    assert len(history) == 1
    assert train_main(train_args(data, out, "--resume")) == 0
    resumed = json.loads((out / "history.json").read_text())
    assert len(resumed) == 2 and resumed[0] == history[0]  # epoch 1 kept, epoch 2 trained
    capsys.readouterr()
    assert train_main(train_args(data, out, "--resume")) == 2
    assert "has finished" in capsys.readouterr().err


# --- item 11: decoding with a bounded footprint ------------------------------------------------------


def gradient(width: int, height: int) -> np.ndarray:
    """A smooth RGB image (noise would make any two resampling methods disagree)."""
    x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    return (np.stack([x, y, (x + y) / 2], axis=-1) * 255).astype(np.uint8)


def test_large_jpeg_is_decoded_at_reduced_size_and_other_formats_are_limited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(decode_module, "MAX_DECODE_PIXELS", 1_000_000)
    pixels = gradient(3000, 2000)  # 6 MP: over the limit in full, 94 kP at the 1/8 scale draft picks
    Image.fromarray(pixels).save(tmp_path / "big.jpg", quality=95)
    Image.fromarray(pixels).save(tmp_path / "big.png")
    decoded = decode_module.decode_image(tmp_path / "big.jpg", 64)
    reference = np.asarray(Image.fromarray(pixels).resize((64, 64), Image.Resampling.BILINEAR))
    assert np.abs(decoded.astype(int) - reference).mean() < 3
    with pytest.raises(decode_module.ImageRejected) as rejected:
        decode_module.decode_image(tmp_path / "big.png", 64)
    assert str(rejected.value).startswith(f"{tmp_path / 'big.png'} would decode to 3000x2000 px (6.0 MP)")


def test_sixteen_bit_image_is_rescaled_without_a_full_size_float_copy(tmp_path: Path) -> None:
    import tracemalloc

    values = (np.linspace(0, 65535, 2000 * 2000).reshape(2000, 2000)).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    tracemalloc.start()  # numpy reports its allocations to tracemalloc; Pillow's own buffers are not counted
    try:
        decoded = decode_module.decode_image(tmp_path / "deep.png", 32)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * 1024**2  # a float64 copy of the image alone is 32 MB
    expected = np.asarray(Image.fromarray(values).resize((32, 32), Image.Resampling.BILINEAR)) / 257
    assert np.abs(decoded[..., 0].astype(float) - expected).max() <= 1
    assert (decoded[..., 0] == decoded[..., 2]).all()


@pytest.mark.parametrize(
    ("changed", "named"),
    [
        (["--set", "epochs=2"], "space.fixed.epochs: 1 then, 2 now"),
        (["--set", "scheduler.reduction_factor=3"], "space.scheduler.reduction_factor: 2.0 then, 3.0 now"),
        (["--mlflow-uri", "sqlite:///elsewhere.db"], "mlflow_uri: "),
        (["--data", "OTHER"], "data: "),
    ],
    ids=["set", "space", "mlflow-uri", "data"],
)
def test_a_search_resumed_with_other_settings_is_refused_naming_them(
    changed: list[str], named: str, small_demo: Path, tmp_path: Path, mlflow_uri: str, decoded, capsys
) -> None:
    from prado_dist.search.storage import locate, write_state
    from prado_dist.tune import build_parser, settings_from_args

    started = search_args(small_demo, tmp_path, mlflow_uri, "--name", "first")
    location = locate(settings_from_args(build_parser().parse_args(started)))
    location.local.mkdir(parents=True)
    (location.local / "tuner.pkl").write_bytes(b"")  # Tune's state, as far as resuming can tell before Ray
    write_state(location, "parent-id", "0", settings_from_args(build_parser().parse_args(started)))
    other_data = painters(tmp_path / "other", {name: 3 for name in PRADO_AUTHORS.values()})
    changed = [str(other_data) if value == "OTHER" else value for value in changed]
    code, err = run_tune([*started, *changed, "--resume"], capsys)
    assert code == 2 and "--resume continues a search with the settings it started with" in err
    assert named in err and not decoded
