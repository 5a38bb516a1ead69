"""`python -m prado_dist.predict --run-id RUN_ID IMAGE...`: painter probabilities from a logged model.

The model logged by a search (MLflow parent run, artifact `model`) carries its own
normalisation; this command only decodes and resizes each image as training did.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import mlflow
import numpy as np
import torch

from prado_dist.config import tracking_uri
from prado_dist.data.decode import ImageRejected, decode_image


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m prado_dist.predict", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-id", help="MLflow run that logged the model (a search's parent run)")
    source.add_argument(
        "--model-uri",
        help="any MLflow model URI, e.g. runs:/RUN_ID/model or models:/NAME/1; loading a model unpickles it, "
        "which can run any code: only load models you trust",
    )
    parser.add_argument("--mlflow-uri", default=None, help="default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image")
    parser.add_argument("images", nargs="+", type=Path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    mlflow.set_tracking_uri(tracking_uri(args.mlflow_uri))
    uri = args.model_uri or f"runs:/{args.run_id}/model"
    try:
        classifier = mlflow.pytorch.load_model(uri, map_location="cpu")
        metadata = mlflow.models.get_model_info(uri).metadata or {}
        classes, image_size = metadata["classes"], int(metadata["image_size"])
    except Exception as err:
        print(f"error: cannot load model {uri!r}: {err}", file=sys.stderr)
        return 2
    status = 0
    for path in args.images:
        try:
            image = decode_image(path, image_size)
        except (ImageRejected, OSError) as err:
            print(f"{path}: skipped: {err}", file=sys.stderr)
            status = 1
            continue
        batch = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].float()
        with torch.no_grad():
            probabilities = classifier(batch)[0].tolist()
        ranked = sorted(zip(classes, probabilities, strict=True), key=lambda pair: -pair[1])
        if args.json:
            print(json.dumps({"image": str(path), "probabilities": dict(ranked)}))
        else:
            print(f"{path}: " + "  ".join(f"{name} {p:.3f}" for name, p in ranked))
    return status


if __name__ == "__main__":
    sys.exit(main())
