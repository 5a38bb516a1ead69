"""Feature cache: a frozen backbone runs once over the images; every later run trains only the head.

The report's transfer learning (section 5.2; ../shared/reference/report-facts.md) trains one new
Dense(5) layer for 25 epochs on a frozen ImageNet base with no augmentation. Every epoch then feeds
the same images through the same fixed function, so the pooled backbone features of every image
are computed once and stored; each trial of a search reads them and trains the head alone
(bench/feature_cache.py measures the difference):

    cache_dir/features/<key>.npy    float32 (N, F): row i = pooled features of image i of the dataset
    cache_dir/features/<key>.json   what was hashed into <key>, for a reader (not read back)
    cache_dir/features/<key>.lock   held while a process builds <key>; others wait, then reuse it

`key` hashes the backbone's weights themselves (a pretrained file, the Hugging Face cache, or a
seeded random init all end up as tensors), the timm architecture and version, the global pooling,
the input normalisation, the dataset fingerprint (image contents, labels, image size) and
`FEATURES_FORMAT_VERSION`. The array is written to a temporary file and renamed into place, so a
reader never sees a half-written one.

The cache is used only when it changes nothing but the cost: a `TransferModel` whose backbone is
fully frozen (`unfreeze_stages == 0`) and no augmentation (`flip_prob == 0`, `pca_std == 0`);
otherwise `feature_cache_decision` says why it is off. Nothing here imports Ray.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from prado_dist.config import TrainConfig
from prado_dist.data import PreparedData, default_cache_dir
from prado_dist.data.cache import build_once
from prado_dist.engine.loop import InputPipeline
from prado_dist.models import TransferModel

logger = logging.getLogger(__name__)

# Bump whenever what a row holds changes (pooling, normalisation, dtype), so old files are not reused.
FEATURES_FORMAT_VERSION = 1
FEATURES_DIR = "features"


# --- when the cache applies -------------------------------------------------------------------------


def feature_cache_decision(config: TrainConfig, model: nn.Module) -> tuple[bool, str | None]:
    """(use the cache?, a message for the user); no message for models without a frozen backbone."""
    if not isinstance(model, TransferModel):
        return False, None
    reasons = []
    if not config.feature_cache:
        reasons.append("feature_cache=false turns it off")
    if model.unfreeze_stages:
        reasons.append(
            f"unfreeze_stages={model.unfreeze_stages} fine-tunes the backbone, so its features change every step"
        )
    augmentation = {"flip_prob": config.flip_prob, "pca_std": config.pca_std}
    augmentations = [f"{key}={value}" for key, value in augmentation.items() if value > 0]
    if augmentations:
        verb = "augments" if len(augmentations) == 1 else "augment"
        reasons.append(f"{' and '.join(augmentations)} {verb} images, so the backbone must see every epoch's images")
    if reasons:
        return False, (
            f"feature cache disabled for {config.model}: {'; '.join(reasons)}. The backbone runs on every "
            "batch of every epoch instead of once"
        )
    return True, f"feature cache on for {config.model}: the frozen backbone runs once, then only the head trains"


# --- what is cached ---------------------------------------------------------------------------------


def weights_digest(module: nn.Module) -> str:
    """sha256 of a module's parameters and buffers (names, dtypes, shapes, bytes), in state_dict order."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        value = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def feature_description(model: TransferModel, data: PreparedData) -> dict[str, object]:
    """Everything the features depend on; its hash names the cache file."""
    return {
        "format": FEATURES_FORMAT_VERSION,
        "timm_name": model.timm_name,
        "timm_version": timm.__version__,
        "global_pool": type(model.global_pool).__name__,
        "pixel_mean_std": [list(values) for values in model.pixel_mean_std],
        # The weights themselves, not where they came from: a random init depends on the seed (and
        # on timm's initialisers), and a weight file may be replaced under the same name.
        "backbone_weights_sha256": weights_digest(model.backbone),
        "data_fingerprint": data.fingerprint,  # image contents, labels, classes, image size
        "images_shape": list(data.images.shape),
    }


def feature_key(model: TransferModel, data: PreparedData) -> str:
    """The cache file's name: the hash of `feature_description`."""
    return _key_of(feature_description(model, data))


def _key_of(description: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


@dataclass
class CachedFeatures:
    """Pooled features of every image of a dataset, memory-mapped from the cache."""

    key: str
    path: Path
    features: np.ndarray  # float32 (N, F), read-only memmap
    built: bool  # True when this call ran the backbone; False when it reused the file
    seconds: float  # time this call spent (building, or waiting and opening)


# --- building and reading ---------------------------------------------------------------------------


def load_or_build_features(
    model: TransferModel,
    data: PreparedData,
    cache_dir: Path | None = None,
    *,
    device: torch.device | None = None,
    batch_size: int = 32,
) -> CachedFeatures:
    """The features of every image of `data` under `model`'s frozen backbone, built once.

    Safe for concurrent processes (Ray workers, trials): one builds under a file lock, the others
    wait and reuse its file. `cache_dir` defaults to the decoded-image cache folder.
    """
    started = time.perf_counter()
    directory = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / FEATURES_DIR
    directory.mkdir(parents=True, exist_ok=True)
    description = feature_description(model, data)
    key = _key_of(description)
    path = directory / f"{key}.npy"
    expected = (len(data.images), model.num_features)

    def build() -> None:
        for leftover in directory.glob(f"{_staging_prefix(key)}*"):  # from a killed build; we hold the lock
            leftover.unlink(missing_ok=True)
        _write_features(model, data, path, key, description, device or _device_of(model), batch_size)

    features, built = build_once(directory / f"{key}.lock", lambda: _open_if_complete(path, expected), build, path)
    done = CachedFeatures(key, path, features, built, time.perf_counter() - started)
    if not built:
        return done
    logger.info(
        "computed %s features of %d images with %s in %.1f s: %s",
        model.num_features, expected[0], model.timm_name, done.seconds, path,
    )  # fmt: skip
    return done


def compute_features(
    model: TransferModel, images: np.ndarray, *, device: torch.device, batch_size: int = 32
) -> torch.Tensor:
    """Pooled features (N, F) of uint8 (N, H, W, 3) images, normalised as the training loop does."""
    return torch.cat(list(_feature_batches(model, images, device=device, batch_size=batch_size)))


def _feature_batches(model: TransferModel, images: np.ndarray, *, device: torch.device, batch_size: int):
    # The evaluation half of the image pipeline: exactly the input the uncached loop gives the model.
    normalise = InputPipeline(0.0, 0.0, model.pixel_mean_std)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size].transpose(0, 3, 1, 2)))
            x = normalise(batch.to(device), train=False)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            # Full precision even where training autocasts: computed once, read by every trial.
            with torch.no_grad():
                yield model.pool_features(x).float().cpu()
    finally:
        model.train(was_training)


def _write_features(
    model: TransferModel,
    data: PreparedData,
    path: Path,
    key: str,
    description: dict[str, object],
    device: torch.device,
    batch_size: int,
) -> None:
    images = data.images
    shape = (len(images), model.num_features)
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=_staging_prefix(key), suffix=".npy")
    os.close(handle)
    try:
        features = np.lib.format.open_memmap(staging, mode="w+", dtype=np.float32, shape=shape)
        row = 0
        batches = _feature_batches(model, images, device=device, batch_size=batch_size)
        with tqdm(total=len(images), desc=f"{model.timm_name} features", unit="img", disable=None) as progress:
            for batch in batches:
                features[row : row + len(batch)] = batch.numpy()
                row += len(batch)
                progress.update(len(batch))
        if row != len(images) or not np.isfinite(features).all():
            raise RuntimeError(f"feature build {path.name}: {row} of {len(images)} rows, or non-finite values")
        features.flush()
        del features
        meta = {**description, "key": key, "shape": list(shape), "dtype": "float32"}
        path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
        os.replace(staging, path)  # publish: readers see the whole file or none
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def _open_if_complete(path: Path, expected_shape: tuple[int, int]) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        features = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        logger.warning("ignoring unreadable features %s: %s", path, err)
        return None
    if features.shape != expected_shape or features.dtype != np.float32:
        logger.warning("ignoring features %s: %s %s, expected %s float32", path, features.shape, features.dtype,
                       expected_shape)  # fmt: skip
        return None
    return features


def _staging_prefix(key: str) -> str:
    return f".{key}.building-"


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# --- training on cached features ------------------------------------------------------------------


class FeatureDataset(Dataset):
    """One split as `(float32 feature vector, int label)` pairs, held in memory (N x F floats is small)."""

    def __init__(self, features: np.ndarray, data: PreparedData, split: str) -> None:
        if split not in data.splits:
            raise ValueError(f"unknown split {split!r}; known splits: {sorted(data.splits)}")
        if len(features) != len(data.labels):
            raise ValueError(f"{len(features)} feature rows for {len(data.labels)} images")
        indices = np.asarray(data.splits[split], dtype=np.int64)
        self.split = split
        self.features = torch.from_numpy(np.ascontiguousarray(features[indices], dtype=np.float32))
        self.labels = torch.from_numpy(np.asarray(data.labels[indices], dtype=np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int]:
        return self.features[item], int(self.labels[item])


class FeaturePipeline:
    """The `InputPipeline` of cached features: nothing to augment or normalise (done before caching)."""

    def __call__(
        self, features: torch.Tensor, *, train: bool, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return features.float()


class FeatureHead(nn.Module):
    """The trainable part of a frozen-backbone model, on pooled features: dropout, then the classifier.

    Its modules are the model's own (shared, not copied): training the head trains the model, whose
    state_dict (what checkpoints store) stays complete. `TransferModel.forward_head` on pooled input.
    """

    def __init__(self, model: TransferModel) -> None:
        super().__init__()
        self.head_drop = model.head_drop
        self.classifier = model.classifier

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head_drop(features))
