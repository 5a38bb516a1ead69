"""The GPU paths: the engine's (bf16 autocast, channels_last weights, pinned loaders, a checkpoint
written on a GPU and read on a CPU and back, backbone features computed on a GPU), Ray Train's (one
worker on a GPU; two workers sharing one, DDP over gloo with SyncBatchNorm) and Ray Tune's (trials
sharing one GPU through fractional GPUs).

Skipped without CUDA (CI has none); run them on a GPU machine with `pytest tests/test_cuda.py`.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from prado_dist.config import TrainConfig
from prado_dist.data import PreparedData, prepare_data
from prado_dist.engine import TrainingRun, evaluate_checkpoint, load_checkpoint, save_checkpoint
from prado_dist.engine.features import compute_features
from prado_dist.models import create_model
from tests.conftest import local_ray

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def tiny_data(small_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> PreparedData:
    return prepare_data(small_demo, 32, cache_dir=tmp_path_factory.mktemp("cache"))


def gpu_config(data_dir: Path, **overrides) -> TrainConfig:
    base = {"model": "mobilenet", "image_size": 32, "epochs": 3, "bn_momentum": 0.3, "data_dir": data_dir}
    return TrainConfig().with_overrides({**base, "device": "cuda", **overrides})


def test_gpu_run_trains_in_bf16_with_channels_last_weights(tiny_data: PreparedData, small_demo: Path) -> None:
    run = TrainingRun(gpu_config(small_demo), tiny_data)
    assert run.device.type == "cuda" and run.autocast_dtype == torch.bfloat16
    convolutions = [p for p in run.network.parameters() if p.dim() == 4]
    assert convolutions and all(p.is_contiguous(memory_format=torch.channels_last) for p in convolutions)
    assert run.loaders["train"].pin_memory
    history = run.fit()
    losses = [epoch["train_loss"] for epoch in history]
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    # Weights stay float32 under autocast (bf16 only inside the forward pass).
    assert all(p.dtype == torch.float32 for p in run.network.parameters())


def test_gpu_checkpoint_evaluates_on_cpu_and_resumes_on_gpu(
    tiny_data: PreparedData, small_demo: Path, tmp_path: Path
) -> None:
    run = TrainingRun(gpu_config(small_demo, epochs=2), tiny_data)
    run.fit()
    gpu_metrics, _ = run.evaluate("val")
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, run.state_dict(epoch=1))

    state = load_checkpoint(path)  # mapped to the CPU
    cpu_metrics, confusion = evaluate_checkpoint(state, tiny_data, "val", device="cpu")
    # bf16 on the GPU against float32 on the CPU: at most a couple of borderline images may flip.
    val_images = int(confusion.sum())
    assert abs(cpu_metrics["val_accuracy"] - gpu_metrics["val_accuracy"]) <= 2 / val_images + 1e-9
    assert cpu_metrics["val_loss"] == pytest.approx(gpu_metrics["val_loss"], rel=0.05)

    resumed = TrainingRun(gpu_config(small_demo, epochs=3), tiny_data)
    resumed.load_state_dict(state)
    assert resumed.start_epoch == 2
    history = resumed.fit()
    assert [epoch["epoch"] for epoch in history] == [0, 1, 2]  # the checkpoint's two, then one more
    assert math.isfinite(history[-1]["train_loss"])
    # Adam's moments came from a checkpoint mapped to the CPU and were moved to the GPU with the weights.
    moments = [
        value for state in resumed.optimizer.state.values() for value in state.values() if torch.is_tensor(value)
    ]
    assert all(moment.device.type == "cuda" for moment in moments if moment.dim())


def test_backbone_features_on_gpu_match_cpu() -> None:
    torch.manual_seed(0)
    model = create_model("mobilenetv2", num_classes=5, image_size=64)
    images = np.random.default_rng(0).integers(0, 256, size=(12, 64, 64, 3), dtype=np.uint8)
    on_cpu = compute_features(model, images, device=torch.device("cpu"), batch_size=8)
    on_gpu = compute_features(model.to("cuda"), images, device=torch.device("cuda"), batch_size=8)
    assert on_gpu.device.type == "cpu" and on_gpu.dtype == torch.float32 and on_gpu.shape == on_cpu.shape
    # TF32 convolutions on the GPU: close, not bit-equal.
    torch.testing.assert_close(on_gpu, on_cpu, rtol=2e-2, atol=2e-2 * float(on_cpu.abs().mean()))


# --- through Ray: one local Ray with the machine's GPU, shared by the tests below ----------------------
@pytest.fixture(scope="module")
def ray_with_gpu() -> None:
    with local_ray(num_cpus=8):  # the GPU is detected; 8 CPUs fit 4 trials of one 2-CPU worker
        yield


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize(
    ("workers", "gpus_per_worker", "devices"),
    [
        pytest.param(1, 1, "cuda:0", id="one-worker"),
        # Ray packs both half-GPU workers onto the one GPU, where NCCL refuses to run (ray-project/ray#48012):
        # the trainer picks gloo for such runs, and SyncBatchNorm synchronises the two shards over it.
        pytest.param(2, 0.5, "cuda:0,cuda:0", id="two-workers-sharing-it"),
    ],
)
def test_ray_train_workers_train_on_the_gpu(
    ray_with_gpu, small_demo: Path, tmp_path: Path, workers: int, gpus_per_worker: float, devices: str
) -> None:
    from prado_dist.distributed import WorkerResources, load_ray_checkpoint, run_training

    config = gpu_config(small_demo, epochs=2, device="auto")
    resources = WorkerResources(workers=workers, cpus_per_worker=2, gpus_per_worker=gpus_per_worker)
    result = run_training(config, resources, storage=tmp_path, name="gpu", max_failures=0)
    assert result.error is None
    assert result.metrics["devices"] == devices
    history = load_ray_checkpoint(result.checkpoint)["history"]  # the last epoch's checkpoint
    assert [epoch["epoch"] for epoch in history] == [0, 1]
    assert all(math.isfinite(epoch["train_loss"]) for epoch in history)


@pytest.mark.ray
@pytest.mark.slow
def test_search_trials_share_the_gpu(ray_with_gpu, small_demo: Path, tmp_path: Path) -> None:
    from prado_dist.distributed import leftover_resources
    from prado_dist.search import SearchSettings, load_space, run_search

    overrides = {
        "num_samples": 4,
        "epochs": 3,
        "image_size": 32,
        "trial.cpus_per_worker": 2,
        "trial.gpus_per_worker": 0.25,  # four trials on the one GPU at once
        "scheduler.grace_period": 1,
        "scheduler.reduction_factor": 2,
    }
    settings = SearchSettings(
        space=load_space("demo", overrides),
        data_dir=small_demo,
        storage=str(tmp_path / "runs"),
        mlflow_uri=f"sqlite:///{tmp_path}/mlflow.db",
        experiment="gpu",
    )
    outcome = run_search(settings)
    trials = list(outcome.trials.values())
    assert len(trials) == 4 and all(trial["status"] == "ok" for trial in trials)
    assert all(trial["devices"] == "cuda:0" for trial in trials)
    # The trials ran side by side: some trial started before another ended (Tune's timestamps are whole
    # seconds; a trial started its first report's time_total_s before that report).
    spans = sorted((t["timestamps"][0] - t["first_report_s"], t["timestamps"][-1]) for t in trials)
    assert any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans)), spans
    assert set(outcome.test) >= {"test_accuracy", "test_balanced_accuracy"}
    leftovers = leftover_resources()
    assert leftovers["placement_groups"] == []
    assert leftovers["available"].get("GPU") == pytest.approx(1.0)
