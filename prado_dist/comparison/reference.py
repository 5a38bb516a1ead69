"""The report's own results, for the leaderboard's reference column.

Test accuracy on the report's 472 held-out images at the last epoch of its single run per model
(../shared/reference/report-facts.md, "Accuracy on the 472 held-out images"; a V100, 224 px, 50
epochs for the custom CNNs, 25 for the frozen backbones). The report selected its models on that same
split, so these are optimistic next to a test split used once; EfficientNet-Lite0 was not in the report.
"""

from __future__ import annotations

REPORT_TEST_ACCURACY: dict[str, float] = {
    "vgg": 0.9555,
    "resnet29": 0.9555,
    "mobilenet": 0.9343,
    "vgg19": 0.8665,
    "resnet50v2": 0.9386,
    "mobilenetv2": 0.9322,
    "efficientnet_b3": 0.9619,
}


def report_test_accuracy(model: str) -> float | None:
    """The report's test accuracy of `model` (a registry name), None for one the report did not train."""
    return REPORT_TEST_ACCURACY.get(model)
