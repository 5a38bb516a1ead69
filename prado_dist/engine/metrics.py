"""Classification metrics computed from a confusion matrix.

Metrics are derived from summed counts (confusion matrix, loss sum, sample count) rather than
averaged per batch or per worker, so that data-parallel evaluation gives exactly the numbers of a
single process: each worker counts its own shard and the counts are summed across workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

# What a run keeps its best checkpoint by unless told otherwise: the classes are imbalanced (Goya
# 46% of the report's paintings), so plain accuracy flatters a model that favours the majority.
SELECTION_METRIC = "val_balanced_accuracy"


@dataclass
class Counts:
    """Sums over an epoch: the basis of every reported metric."""

    confusion: torch.Tensor  # (C, C) int64, rows = true class, columns = predicted class
    loss_sum: float
    samples: int

    @classmethod
    def zeros(cls, num_classes: int) -> Counts:
        return cls(torch.zeros(num_classes, num_classes, dtype=torch.int64), 0.0, 0)

    def add(self, logits: torch.Tensor, labels: torch.Tensor, loss_sum: float) -> None:
        predicted = logits.argmax(dim=1).cpu()
        num_classes = self.confusion.shape[0]
        flat = labels.cpu() * num_classes + predicted
        self.confusion += torch.bincount(flat, minlength=num_classes**2).view(num_classes, num_classes)
        self.loss_sum += loss_sum
        self.samples += labels.numel()

    def all_reduced(self) -> Counts:
        """The counts summed over all ranks of the default process group (no-op when not distributed)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        num_classes = self.confusion.shape[0]
        packed = torch.cat(
            [self.confusion.flatten().double(), torch.tensor([self.loss_sum, self.samples], dtype=torch.float64)]
        )
        # gloo reduces CPU tensors; NCCL needs them on this rank's GPU.
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        packed = packed.to(device)
        dist.all_reduce(packed)
        packed = packed.cpu()
        confusion = packed[: num_classes**2].round().long().view(num_classes, num_classes)
        return Counts(confusion, float(packed[-2]), int(packed[-1].round()))


def metrics_from_counts(counts: Counts, classes: list[str], prefix: str) -> dict[str, float]:
    """Loss, accuracy, balanced accuracy, macro-F1 and per-class recall/precision, keys prefixed."""
    confusion = counts.confusion.double()
    true_per_class = confusion.sum(dim=1)
    predicted_per_class = confusion.sum(dim=0)
    correct = confusion.diag()
    recall = torch.where(true_per_class > 0, correct / true_per_class.clamp_min(1), torch.nan)
    precision = torch.where(predicted_per_class > 0, correct / predicted_per_class.clamp_min(1), 0.0)
    f1 = torch.where(
        precision + recall.nan_to_num(0) > 0,
        2 * precision * recall.nan_to_num(0) / (precision + recall.nan_to_num(0)).clamp_min(1e-12),
        0.0,
    )
    present = ~recall.isnan()
    samples = max(counts.samples, 1)
    metrics = {
        f"{prefix}loss": counts.loss_sum / samples,
        f"{prefix}accuracy": float(correct.sum() / samples),
        # Balanced accuracy = mean recall over the classes present (sklearn's definition).
        f"{prefix}balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        f"{prefix}macro_f1": float(f1[present].mean()) if present.any() else 0.0,
    }
    for index, name in enumerate(classes):
        metrics[f"{prefix}recall_{name}"] = float(recall[index].nan_to_num(0.0))
        metrics[f"{prefix}precision_{name}"] = float(precision[index])
    return metrics
