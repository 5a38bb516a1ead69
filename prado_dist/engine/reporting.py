"""What a person looks at after a run: per-epoch lines, a confusion matrix, learning curves.
(A search's own figures are in prado_dist/search/plots.py.)"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def epoch_line(metrics: dict[str, float], epochs: int) -> str:
    """One readable line per epoch."""
    return (
        f"epoch {int(metrics['epoch']) + 1:>3}/{epochs}  lr {metrics['lr']:.2e}  "
        f"train loss {metrics['train_loss']:.4f} acc {metrics['train_accuracy']:.3f}  "
        f"val loss {metrics['val_loss']:.4f} acc {metrics['val_accuracy']:.3f} "
        f"bal-acc {metrics['val_balanced_accuracy']:.3f} f1 {metrics['val_macro_f1']:.3f}  "
        f"{metrics['images_per_second']:.0f} img/s"
    )


def confusion_table(confusion: torch.Tensor, classes: Sequence[str]) -> str:
    """The confusion matrix as text (rows: true painter, columns: predicted)."""
    width = max(8, *(len(name) + 1 for name in classes))
    lines = ["true \\ pred".ljust(width) + "".join(name.rjust(width) for name in classes)]
    for name, row in zip(classes, confusion.tolist(), strict=True):
        lines.append(name.ljust(width) + "".join(str(value).rjust(width) for value in row))
    return "\n".join(lines)


def write_confusion_csv(confusion: torch.Tensor, classes: Sequence[str], path: Path) -> Path:
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["true\\predicted", *classes])
        for name, row in zip(classes, confusion.tolist(), strict=True):
            writer.writerow([name, *row])
    return path


def plot_confusion(confusion: torch.Tensor, classes: Sequence[str], path: Path, title: str = "") -> Path:
    """Confusion matrix heat map, each row normalised to recall, with the raw counts written in."""
    counts = confusion.double()
    recall = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    figure, axes = plt.subplots(figsize=(5.5, 4.8))
    image = axes.imshow(recall.numpy(), cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axes.set_yticks(range(len(classes)), classes)
    axes.set_xlabel("predicted painter")
    axes.set_ylabel("true painter")
    for i in range(len(classes)):
        for j in range(len(classes)):
            colour = "white" if recall[i, j] > 0.5 else "black"
            axes.text(j, i, int(confusion[i, j]), ha="center", va="center", color=colour)
    figure.colorbar(image, ax=axes, label="fraction of the true painter's images")
    axes.set_title(title or "test confusion matrix")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_learning_curves(history: Sequence[dict[str, float]], path: Path, title: str = "") -> Path:
    """Loss and accuracy per epoch for training and validation, and the learning rate."""
    epochs = [int(m["epoch"]) + 1 for m in history]
    figure, (loss_axes, accuracy_axes, lr_axes) = plt.subplots(1, 3, figsize=(13, 3.8))
    loss_axes.plot(epochs, [m["train_loss"] for m in history], label="train")
    loss_axes.plot(epochs, [m["val_loss"] for m in history], label="validation")
    loss_axes.set_title("loss")
    accuracy_axes.plot(epochs, [m["train_accuracy"] for m in history], label="train accuracy")
    accuracy_axes.plot(epochs, [m["val_accuracy"] for m in history], label="val accuracy")
    accuracy_axes.plot(epochs, [m["val_balanced_accuracy"] for m in history], label="val balanced accuracy")
    accuracy_axes.set_ylim(0, 1)
    accuracy_axes.set_title("accuracy")
    lr_axes.plot(epochs, [m["lr"] for m in history])
    lr_axes.set_yscale("log")
    lr_axes.set_title("learning rate")
    for axes in (loss_axes, accuracy_axes, lr_axes):
        axes.set_xlabel("epoch")
        axes.grid(alpha=0.3)
    loss_axes.legend()
    accuracy_axes.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
