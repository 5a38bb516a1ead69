"""A training run assembled from a `TrainConfig`: model, optimiser, schedule, loss, loaders.

`TrainingRun` is the one training loop of prado_dist. The single-process CLI drives it directly;
the Ray Train layer (prado_dist.distributed) drives the same object on every worker, passing its
rank, the world size and a function that wraps the model for data parallelism. Nothing here
imports Ray.

With a frozen transfer backbone and no augmentation the run trains the head alone on cached
features (features.py): `network` is always the whole model, `model` is what the loops train (the
head, or the whole model), and `pipeline` turns a loader's batch into `model`'s input.

`evaluated_network` is what the run validates, checkpoints as "model" and exports: `network`
itself, or with `ema_decay` a moving average of its weights (training itself is unchanged). With
`bn_recalibration_images` its BatchNorm statistics are recomputed before every validation
(batchnorm.py), in place: checkpoints and exports hold the statistics that were evaluated.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from prado_dist.config import SCHEDULABLE, ConfigError, TrainConfig
from prado_dist.data import PaintingsDataset, PreparedData, class_weights, output_bias, prepare_data, split_counts
from prado_dist.engine.batchnorm import recalibrate_batchnorm, training_batchnorm_layers
from prado_dist.engine.checkpoint import CheckpointError, checkpoint_config
from prado_dist.engine.features import (
    FeatureDataset,
    FeatureHead,
    FeaturePipeline,
    feature_cache_decision,
    load_or_build_features,
)
from prado_dist.engine.loop import InputPipeline, evaluate, train_one_epoch, weighted_cross_entropy
from prado_dist.engine.schedule import exponential_decay_after, set_learning_rate
from prado_dist.models import TransferModel, create_model

logger = logging.getLogger(__name__)
EpochCallback = Callable[[int, dict[str, float], "TrainingRun"], None]


def load_data(config: TrainConfig) -> PreparedData:
    """The decoded, split images that `config` trains on (decoded once per machine, then reused)."""
    return prepare_data(
        config.data_dir,
        config.image_size,
        cache_dir=config.cache_dir,
        test_fraction=config.test_fraction,
        val_fraction=config.val_fraction,
        split_seed=config.split_seed,
    )


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """ "auto" -> this rank's GPU when CUDA is available, else the CPU."""
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's own message lists every device type it was built with
        raise ValueError(
            f"device {name!r} is not a PyTorch device; use auto, cpu or cuda (cuda:N for GPU N)"
            + ("" if torch.cuda.is_available() else "; no CUDA GPU is visible here, so auto means cpu")
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu or auto")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cpu_threads(local_world_size: int = 1) -> int:
    """Intra-op threads per process: Ray's OMP_NUM_THREADS when set, else the cores shared out."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, (os.cpu_count() or 1) // max(1, local_world_size))


class ShardSampler(Sampler[int]):
    """Every `world_size`-th index from `rank`: disjoint shards covering a split exactly once.

    Unlike DistributedSampler, it never pads, so no validation image is counted twice.
    """

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


_announced: set[str] = set()


def announce_once(message: str, level: int = logging.INFO) -> None:
    """Log `message` once per process (a search's trials reuse worker processes)."""
    if message not in _announced:
        _announced.add(message)
        logger.log(level, message)


class TrainingRun:
    """Everything one (possibly data-parallel) training run needs, built from `config`."""

    def __init__(
        self,
        config: TrainConfig,
        data: PreparedData,
        *,
        rank: int = 0,
        world_size: int = 1,
        local_rank: int = 0,
        device: torch.device | None = None,
        wrap_model: Callable[[nn.Module], nn.Module] | None = None,
        loader_workers: int | None = None,
    ) -> None:
        if config.batch_size % world_size:
            raise ValueError(f"the global batch size {config.batch_size} must be divisible by the {world_size} workers")
        self.config = config
        self.data = data
        self.classes = list(data.classes)
        self.rank, self.world_size = rank, world_size
        self.device = device or resolve_device(config.device, local_rank)
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads())
        seed_everything(config.seed)

        train_counts = split_counts(data)["train"]
        model = self._build_network(train_counts)
        self.network = model  # the whole model as trained
        # The averaged copy: validation, checkpoints' "model" and exports use it (None: `network`).
        self.ema = ModelEmaV3(model, decay=config.ema_decay, use_warmup=True) if config.ema_decay else None
        self.ema_steps = 0  # optimiser steps averaged so far: the warm-up's clock, kept in checkpoints
        self.image_pipeline = InputPipeline(config.flip_prob, config.pca_std, getattr(model, "pixel_mean_std", None))
        self.use_features, message = feature_cache_decision(config, model)
        self.features_built = False  # True once this run (not an earlier one) ran the backbone over the data
        self.features_seconds = 0.0  # spent getting the features: the backbone pass, or opening the file
        if rank == 0:
            self._announce_choices(message, model)
        trained = FeatureHead(model) if self.use_features else model
        self.pipeline = FeaturePipeline() if self.use_features else self.image_pipeline
        weights = torch.tensor(class_weights(train_counts), dtype=torch.float32, device=self.device)
        self._class_weights = weights if config.class_weights else None
        self.loss_fn = weighted_cross_entropy(self._class_weights, config.label_smoothing)
        self.optimizer, self.scheduler = self._build_optimisation(model)
        # DDP wraps what is trained: with cached features only the head's gradients are all-reduced.
        self.model = wrap_model(trained) if wrap_model is not None else trained
        # bf16 autocast on GPUs (tensor cores); full precision on the CPU, where it would be slower.
        self.autocast_dtype = torch.bfloat16 if self.device.type == "cuda" else None
        self._loader_workers = loader_workers
        self._loaders: dict[str, DataLoader] | None = None
        self.start_epoch = 0
        self.history: list[dict[str, float]] = []
        self.settings_history: list[dict[str, float]] = []  # per epoch: the SCHEDULABLE values it trained with
        self._warned_one_class = False

    def _build_optimisation(self, model: nn.Module):
        config = self.config
        trainable = [p for p in model.parameters() if p.requires_grad]
        # Keras Adam defaults (report): beta1 0.9, beta2 0.999, epsilon 1e-7.
        optimizer = torch.optim.Adam(
            trainable, lr=config.lr, betas=(0.9, 0.999), eps=1e-7, weight_decay=config.weight_decay
        )
        return optimizer, exponential_decay_after(optimizer, config.decay_start, config.decay)

    def _build_network(self, train_counts: list[int]) -> nn.Module:
        """The configured model on this run's device, in the layout and BatchNorm this run trains with."""
        config = self.config
        model = create_model(config.model, num_classes=len(self.classes), **self._model_kwargs(train_counts))
        if config.bn_momentum is not None:
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.momentum = config.bn_momentum
        model = model.to(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)  # faster convolutions on tensor cores
            if self.world_size > 1:
                # BatchNorm statistics over the whole global batch, as in one process (the report's
                # 32 images), not over each GPU's shard. SyncBatchNorm exists for GPUs only: on the
                # CPU every worker normalises its own shard (docs/distributed.md).
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def _announce_choices(self, feature_message: str | None, model: nn.Module) -> None:
        """Say once whether backbone features are cached, and when a transfer backbone is untrained."""
        if feature_message:
            announce_once(feature_message, logging.INFO if self.use_features else logging.WARNING)
        if isinstance(model, TransferModel) and self.config.pretrained is None:
            announce_once(
                f"{self.config.model}: no pretrained weights given, so the backbone is randomly initialised (seed "
                f"{self.config.seed}) and is not the report's ImageNet feature extractor; pass pretrained=PATH, "
                "hf-cache or package (lite0; docs/transfer.md)",
                logging.WARNING,
            )

    def _model_kwargs(self, train_counts: list[int]) -> dict[str, Any]:
        config = self.config
        kwargs: dict[str, Any] = {"image_size": config.image_size}
        if config.output_bias:
            kwargs["output_bias"] = output_bias(train_counts).tolist()
        if config.dropout:
            kwargs["dropout"] = config.dropout
        if config.pretrained is not None:
            kwargs["pretrained"] = config.pretrained
        if config.unfreeze_stages:
            kwargs["unfreeze_stages"] = config.unfreeze_stages
        return kwargs

    @property
    def loaders(self) -> dict[str, DataLoader]:
        """train/val/test loaders, made on first use: a cached run computes or opens its features then,
        after any checkpoint has been loaded, and a run built only to export a model never does."""
        if self._loaders is None:
            self._loaders = self._make_loaders(self._loader_workers)
        return self._loaders

    def _make_loaders(self, workers: int | None) -> dict[str, DataLoader]:
        on_gpu = self.device.type == "cuda"
        # Batches are memcpy'd from the memory-mapped cache: on a CPU-only machine extra loader
        # processes only compete with training for the same cores; on a GPU they keep it fed.
        workers = workers if workers is not None else (min(4, os.cpu_count() or 1) if on_gpu else 0)
        if self.use_features:
            workers = 0  # a batch of cached features is one in-memory index: nothing to parallelise
            cached = load_or_build_features(
                self.network, self.data, self.config.cache_dir, device=self.device, batch_size=self.config.batch_size
            )
            self.features_built = self.features_built or cached.built
            self.features_seconds += cached.seconds

            def dataset_of(split: str) -> Dataset:
                return FeatureDataset(cached.features, self.data, split)
        else:

            def dataset_of(split: str) -> Dataset:
                return PaintingsDataset(self.data, split)

        common = {"num_workers": workers, "pin_memory": on_gpu, "persistent_workers": workers > 0}
        per_rank_batch = self.config.batch_size // self.world_size
        train = dataset_of("train")
        self.train_sampler = DistributedSampler(
            train, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=self.config.seed
        )
        loaders = {"train": DataLoader(train, per_rank_batch, sampler=self.train_sampler, **common)}
        for split in ("val", "test"):
            dataset = dataset_of(split)
            sampler = ShardSampler(len(dataset), self.rank, self.world_size)
            loaders[split] = DataLoader(dataset, per_rank_batch, sampler=sampler, **common)
        return loaders

    # --- one epoch ----------------------------------------------------------------------------
    def run_epoch(self, epoch: int) -> dict[str, float]:
        """Train one epoch, step the schedule, evaluate on validation; the epoch's metrics."""
        if epoch in self.config.schedule:
            self.apply_settings(self.config.schedule[epoch])
        self.settings_history.append({"epoch": epoch, **{key: getattr(self.config, key) for key in SCHEDULABLE}})
        loaders = self.loaders  # a cached run's first epoch computes or opens the features here
        self.train_sampler.set_epoch(epoch)  # a new shuffle every epoch, the same on every rank
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch * 1009 + self.rank)
        lr = self.optimizer.param_groups[0]["lr"]
        metrics = train_one_epoch(
            self.model,
            loaders["train"],
            self.optimizer,
            self.loss_fn,
            self.pipeline,
            device=self.device,
            epoch=epoch,
            classes=self.classes,
            generator=generator,
            autocast_dtype=self.autocast_dtype,
            on_step=self._update_average if self.ema is not None else None,
        )
        self.scheduler.step()
        if self.config.bn_recalibration_images is not None:
            metrics["bn_recalibration_seconds"] = self.recalibrate_batchnorm()
        val_metrics, val_counts = self.evaluate("val")
        self._warn_if_one_class(epoch, val_counts)
        metrics = {"epoch": epoch, "epochs_completed": epoch + 1, "lr": lr, **metrics, **val_metrics}
        if isinstance(self.network, TransferModel):
            # Recorded with every trial (MLflow): whether the head trained on cached features, and
            # whether this run paid the backbone pass (the first trial) or reused another's.
            metrics.update(feature_cache=float(self.use_features), feature_cache_built=float(self.features_built))
        return metrics

    def apply_settings(self, changes: dict[str, float]) -> None:
        """Change SCHEDULABLE settings between epochs, keeping weights, optimiser moments and the
        schedule's position: `lr` is the schedule's initial value, so the epoch's learning rate is
        the new `lr` times the decay reached so far (population-based search, a replayed schedule)."""
        unknown = sorted(set(changes) - set(SCHEDULABLE))
        if unknown:
            raise ConfigError(f"{unknown} cannot change during a run; only {list(SCHEDULABLE)} can")
        config = self.config.with_overrides(changes)
        if self.use_features and (config.pca_std > 0 or config.flip_prob > 0):
            raise ConfigError(
                f"{self.config.model} trains its head on cached backbone features, which cannot be augmented "
                "later (pca_std, flip_prob): set feature_cache=false to change augmentation during the run"
            )
        self.config = config
        self._apply_current_settings()

    def _apply_current_settings(self) -> None:
        config = self.config
        self.image_pipeline = dataclasses.replace(
            self.image_pipeline, flip_prob=config.flip_prob, pca_std=config.pca_std
        )
        if not self.use_features:
            self.pipeline = self.image_pipeline
        self.loss_fn = weighted_cross_entropy(self._class_weights, config.label_smoothing)
        for group in self.optimizer.param_groups:
            group["weight_decay"] = config.weight_decay
        set_learning_rate(self.scheduler, config.lr, config.decay_start, config.decay)

    def _update_average(self, step: int, loss: float) -> None:
        self.ema_steps += 1
        self.ema.update(self.network, step=self.ema_steps)

    def recalibrate_batchnorm(self, network: nn.Module | None = None, images: int | None = None) -> float:
        """Recompute the BatchNorm statistics of `network` (default: the evaluated one) from `images`
        (default: `bn_recalibration_images`) training images, the same ones every time; the seconds it took."""
        started = time.perf_counter()
        network = network if network is not None else self.evaluated_network
        if not training_batchnorm_layers(network):
            return 0.0  # e.g. a frozen backbone's BatchNorm (feature cache included): nothing to recompute
        batches = (batch for batch, _ in self._recalibration_loader(images or self.config.bn_recalibration_images))
        recalibrate_batchnorm(
            network,
            batches,
            lambda batch: self.image_pipeline(batch, train=False),  # the inputs that evaluation sees
            device=self.device,
            autocast_dtype=self.autocast_dtype,
        )
        return time.perf_counter() - started

    def _recalibration_loader(self, images: int) -> DataLoader:
        """This rank's share of `images` training images (a fixed random subset), in whole batches.

        Every rank gets as many batches as the others (SyncBatchNorm's forward is collective), and
        the loader has its own generator: the pass draws nothing from the global random stream, so
        training (dropout) goes on exactly as without it.
        """
        per_rank_batch = self.config.batch_size // self.world_size
        train_size = len(self.data.splits["train"])
        # At least 2 images a rank: train-mode BatchNorm1d (VGG's head) refuses a batch of one.
        per_rank = max(2, min(images, train_size) // self.world_size)
        if per_rank >= per_rank_batch:
            per_rank -= per_rank % per_rank_batch  # no small last batch: its batch statistics would be noisy
        order = torch.randperm(train_size, generator=torch.Generator().manual_seed(self.config.seed)).tolist()
        indices = order[: per_rank * self.world_size][self.rank :: self.world_size]
        subset = Subset(PaintingsDataset(self.data, "train"), indices)
        return DataLoader(subset, per_rank_batch, generator=torch.Generator(), pin_memory=self.device.type == "cuda")

    def _warn_if_one_class(self, epoch: int, counts: Any) -> None:
        """Warn once per run when validation predicts the same class for every image."""
        predicted = counts.confusion.sum(dim=0)
        present = int((counts.confusion.sum(dim=1) > 0).sum())
        if self._warned_one_class or self.rank != 0 or present < 2 or int((predicted > 0).sum()) != 1:
            return
        self._warned_one_class = True
        only = self.classes[int(predicted.argmax())]
        if self.config.bn_recalibration_images is None:
            momentum = self.config.bn_momentum or "the models' Keras 0.01"
            cause = (
                f"Likely cause: BatchNorm running statistics that still lag the weights (bn_momentum {momentum}); "
                "recompute them before validation with bn_recalibration_images=256 (--set "
                "bn_recalibration_images=256), or set bn_momentum=0.1"
            )
        else:
            cause = (
                "The BatchNorm statistics were recomputed, so the weights themselves predict one class: likely "
                f"a learning rate too high for this data (lr={self.config.lr:g}) or too few epochs; try a lower "
                "lr or more epochs"
            )
        logger.warning(
            "%s: validation after epoch %d predicted %r for all %d images. %s",
            self.config.model,
            epoch + 1,
            only,
            counts.samples,
            cause,
        )

    @property
    def evaluated_network(self) -> nn.Module:
        """The whole model that is validated, checkpointed and exported: the average, if the run keeps one."""
        return self.ema.module if self.ema is not None else self.network

    def evaluate(self, split: str = "val") -> tuple[dict[str, float], Any]:
        """Metrics of the current model over a whole split (and the summed confusion counts)."""
        if self.ema is None:
            model = unwrap(self.model)  # no DDP needed to evaluate: each rank reads its own shard
        else:  # the average, on what the loops feed it (cached features or images)
            model = FeatureHead(self.evaluated_network) if self.use_features else self.evaluated_network
        return evaluate(
            model,
            self.loaders[split],
            self.loss_fn,
            self.pipeline,
            device=self.device,
            classes=self.classes,
            prefix=f"{split}_",
            autocast_dtype=self.autocast_dtype,
        )

    def fit(self, on_epoch_end: EpochCallback | None = None) -> list[dict[str, float]]:
        """Train from `start_epoch` to `config.epochs`, calling `on_epoch_end` after every epoch."""
        for epoch in range(self.start_epoch, self.config.epochs):
            metrics = self.run_epoch(epoch)
            self.history.append(metrics)
            if on_epoch_end is not None:
                on_epoch_end(epoch, metrics, self)
        return self.history

    # --- checkpoints --------------------------------------------------------------------------
    def state_dict(self, epoch: int) -> dict[str, Any]:
        """A weights-only-loadable checkpoint of the state after `epoch`.

        "model" holds the weights to evaluate and export (the average, with `ema_decay`); a run that
        averages also stores the weights it trains on, to resume from them.
        """
        state = {
            "model": self.evaluated_network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": epoch,
            "config": self.config.model_dump_json(),
            "classes": self.classes,
            "history": self.history,
            "settings_history": self.settings_history,
            "data_fingerprint": self.data.fingerprint,
        }
        if self.ema is not None:
            state.update(trained_model=self.network.state_dict(), ema_steps=self.ema_steps)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the checkpointed epoch with the same weights, optimiser state and schedule."""
        if (self.ema is not None) != ("trained_model" in state):
            raise CheckpointError(
                f"the checkpoint was saved by a run {'with' if 'trained_model' in state else 'without'} an average "
                f"of its weights, and this run has ema_decay={self.config.ema_decay}: resume it with the "
                "settings it was saved with"
            )
        self.load_model_state(state["model"])
        if self.ema is not None:
            self.network.load_state_dict(state["trained_model"])  # training goes on from the trained weights
            self.ema_steps = int(state["ema_steps"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.history = list(state.get("history", []))
        self.settings_history = list(state.get("settings_history", []))
        self.start_epoch = int(state["epoch"]) + 1
        # Training goes on with this run's settings, not the checkpoint's optimiser values: the same
        # on a resume, perturbed ones for a member that copied another's checkpoint (population-based search).
        self.config = self.config.with_overrides(
            self.config.settings_at(self.start_epoch - 1).model_dump(include=set(SCHEDULABLE))
        )
        self._apply_current_settings()

    def load_model_state(self, model_state: dict[str, torch.Tensor]) -> None:
        """Load the whole model's weights (a checkpoint's "model") to evaluate or export them; cached
        features follow the new backbone."""
        self.network.load_state_dict(model_state)
        if self.ema is not None:
            self.ema.module.load_state_dict(model_state)
        if self.use_features:
            self._loaders = None  # features are keyed by the backbone's weights: reopen (or build) them


def evaluate_checkpoint(
    state: dict[str, Any], data: PreparedData, split: str = "test", device: str = "auto"
) -> tuple[dict[str, float], torch.Tensor]:
    """Metrics and confusion matrix of a checkpoint's model on one split (single process)."""
    config = checkpoint_config(state).with_overrides({"device": device})
    run = TrainingRun(config, data)
    run.load_model_state(state["model"])
    metrics, counts = run.evaluate(split)
    return metrics, counts.confusion
