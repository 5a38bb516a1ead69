"""BatchNorm statistics recomputed for the weights being evaluated (PreciseBN).

Running statistics kept with a small momentum (the report's Keras 0.99, PyTorch 0.01) lag the
weights by hundreds of steps, so a short run is evaluated with statistics its weights never
produced (issue 22). `recalibrate_batchnorm` replaces them with the exact population mean and
variance of every BatchNorm layer's input over a fixed set of training images, as the network in
training mode produces them ("Rethinking 'Batch' in BatchNorm", Wu & Johnson 2021, section 3;
`torch.optim.swa_utils.update_bn` averages per-batch moments instead of pooling them).

Only layers that train are touched: a frozen backbone's BatchNorm stays in eval mode under
`model.train()` (models/transfer.py) and keeps its statistics. Under data parallelism the per-rank
sums are all-reduced, so every rank ends with the statistics of the union of the ranks' images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

Preprocess = Callable[[torch.Tensor], torch.Tensor]


class _InputMoments:
    """Per-channel sum, sum of squares and count of the values a BatchNorm layer receives."""

    def __init__(self, layer: nn.modules.batchnorm._BatchNorm) -> None:
        device = layer.running_mean.device
        self.sums = torch.zeros(layer.num_features, dtype=torch.float64, device=device)
        self.squares = torch.zeros_like(self.sums)
        self.count = torch.zeros(1, dtype=torch.float64, device=device)

    def __call__(self, layer: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        values = inputs[0].detach().double()
        channel_last = values.transpose(0, 1).reshape(values.shape[1], -1)  # C x (N * spatial)
        self.sums += channel_last.sum(dim=1)
        self.squares += channel_last.square().sum(dim=1)
        self.count += channel_last.shape[1]


def training_batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers that `model.train()` puts in training mode (frozen ones excluded)."""
    was_training = model.training
    model.train()
    layers = [
        module
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training and module.track_running_stats
    ]
    model.train(was_training)
    return layers


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    preprocess: Preprocess,
    *,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> int:
    """Set the running mean and (unbiased) variance of `model`'s training BatchNorm layers to those
    of their inputs over `batches` (summed over ranks); returns the number of images seen, over all
    ranks. Weights, `num_batches_tracked` and the model's train/eval mode are left as they were.

    Under SyncBatchNorm every rank must pass the same number of batches (its forward is collective).
    """
    layers = training_batchnorm_layers(model)
    if not layers:
        return 0
    moments = [_InputMoments(layer) for layer in layers]
    batches_tracked = [layer.num_batches_tracked.clone() for layer in layers]
    images_seen = _measure_inputs(model, layers, moments, batches, preprocess, device, autocast_dtype)
    _all_reduce(moments)
    for layer, moment, tracked in zip(layers, moments, batches_tracked, strict=True):
        mean = moment.sums / moment.count
        variance = (moment.squares - moment.count * mean.square()) / (moment.count - 1).clamp_min(1)
        layer.running_mean.copy_(mean)
        layer.running_var.copy_(variance.clamp_min(0))
        layer.num_batches_tracked.copy_(tracked)
    return int(_summed(torch.tensor([float(images_seen)], dtype=torch.float64, device=device)).item())


def _measure_inputs(
    model: nn.Module,
    layers: list[nn.modules.batchnorm._BatchNorm],
    moments: list[_InputMoments],
    batches: Iterable[torch.Tensor],
    preprocess: Preprocess,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
) -> int:
    """Run `batches` through `model` in training mode, each of `moments` summing its layer's inputs;
    the images seen on this rank. The hooks are removed and the model's mode restored afterwards."""
    handles = [layer.register_forward_pre_hook(hook) for layer, hook in zip(layers, moments, strict=True)]
    was_training = model.training
    images_seen = 0
    try:
        model.train()  # batch statistics, as in training: each layer sees what the trained weights produce
        for images in batches:
            images = images.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                model(preprocess(images))
            images_seen += len(images)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return images_seen


def _process_group_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _summed(values: torch.Tensor) -> torch.Tensor:
    """`values` summed over the ranks of the default process group (unchanged without one)."""
    if not _process_group_active():
        return values
    # gloo reduces CPU tensors; NCCL needs them on this rank's GPU.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    reduced = values.to(device)
    dist.all_reduce(reduced)
    return reduced.to(values.device)


def _all_reduce(moments: list[_InputMoments]) -> None:
    """Every layer's sums over all ranks, in one all-reduce."""
    if not _process_group_active():
        return
    packed = _summed(torch.cat([torch.cat([m.sums, m.squares, m.count]) for m in moments]))
    offset = 0
    for moment in moments:
        channels = moment.sums.numel()
        moment.sums.copy_(packed[offset : offset + channels])
        moment.squares.copy_(packed[offset + channels : offset + 2 * channels])
        moment.count.copy_(packed[offset + 2 * channels : offset + 2 * channels + 1])
        offset += 2 * channels + 1
