"""Models the project defines (and, where weights ship, trains) itself: `zoo:<name>` on the CLI.

Why a zoo: the quick start, the tests and the benchmarks need real, trained models without
downloading anything; `zoo:mobilenetv2` also gives users the torchvision architecture to load
their own checkpoint into with `--weights`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources

import numpy as np

from lepton_edge.datasets import FASHION_LABELS, fashion_mnist
from lepton_edge.errors import BadInput, closest

# Fashion-MNIST training-set statistics.
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530


@dataclass
class ZooModel:
    name: str
    description: str
    build: Callable[[], object]
    input_hw: tuple[int, int]
    color: str
    mean: list[float]
    std: list[float]
    weights: str | None = None  # file under zoo/weights/, shipped in the package
    labels: list[str] | None = None
    dataset: str | None = None  # "fashion-mnist" (labelled) or "photos" (unlabelled): calibration data
    labelled: bool = True  # False: the data set serves calibration and agreement, not accuracy
    task: str = "classify"
    train: dict = field(default_factory=dict)  # recipe for zoo/train.py

    def weights_path(self):
        return resources.files(__name__) / "weights" / self.weights if self.weights else None

    def load(self, weights: str | None = None):
        """Build the module and load shipped weights (or a user's file); eval mode."""
        from lepton_edge.zoo.weights_io import load_state_dict

        model = self.build()
        src = weights or self.weights_path()
        if src is not None:
            load_state_dict(model, src)
        return model.eval()

    def input_spec(self, hw: tuple[int, int] | None = None, layout: str = "NCHW"):
        from lepton_edge.bundle import InputSpec

        h, w = hw or self.input_hw
        c = 1 if self.color == "GRAY" else 3
        shape = [1, c, h, w] if layout == "NCHW" else [1, h, w, c]
        return InputSpec(name="input", shape=shape, layout=layout, color=self.color, mean=self.mean, std=self.std)

    def data(self, split: str) -> tuple[np.ndarray, np.ndarray | None] | None:
        """(raw uint8 images, labels or None) of the zoo model's own data set, or None."""
        if self.dataset == "fashion-mnist":
            return fashion_mnist(split)
        if self.dataset == "photos":
            from lepton_edge.datasets import photo_crops

            n, seed = (100, 0) if split == "train" else (64, 1)
            return photo_crops(n, self.input_hw[0], seed), None
        return None


def _fashion_cnn():
    from lepton_edge.zoo.fashion_cnn import FashionCNN

    return FashionCNN()


def _fashion_embedder():
    from lepton_edge.zoo.fashion_cnn import FashionEmbedder

    return FashionEmbedder()


def _mnv2():
    from lepton_edge.zoo.mobilenetv2 import MobileNetV2

    return MobileNetV2()


def _mnv2_fashion():
    from lepton_edge.zoo.mobilenetv2 import mobilenet_v2_fashion

    return mobilenet_v2_fashion()


MODELS: dict[str, ZooModel] = {
    m.name: m
    for m in [
        ZooModel(
            "fashion-cnn", "demo classifier: 3-conv CNN trained on Fashion-MNIST (28x28 gray)",
            _fashion_cnn, (28, 28), "GRAY", [FASHION_MEAN], [FASHION_STD],
            weights="fashion-cnn.pt", labels=FASHION_LABELS, dataset="fashion-mnist",
            train={"epochs": 4, "lr": 0.05, "batch": 128},
        ),
        ZooModel(
            "fashion-cnn-embed", "the demo classifier's 128-d features as an embedding model (task embed)",
            _fashion_embedder, (28, 28), "GRAY", [FASHION_MEAN], [FASHION_STD],
            weights="fashion-cnn.pt", dataset="fashion-mnist", labelled=False, task="embed",
        ),
        ZooModel(
            "mobilenetv2-fashion",
            "narrow MobileNetV2 (width 0.5) trained on Fashion-MNIST; depthwise convs, int8 < 1 MB",
            _mnv2_fashion, (28, 28), "GRAY", [FASHION_MEAN], [FASHION_STD],
            weights="mobilenetv2-fashion.pt", labels=FASHION_LABELS, dataset="fashion-mnist",
            train={"epochs": 3, "lr": 0.05, "batch": 128},
        ),
        ZooModel(
            "mobilenetv2", "MobileNetV2 1.0 (torchvision key names, 224x224 RGB, ImageNet normalisation); "
            "random weights unless --weights",
            _mnv2, (224, 224), "RGB", [0.485, 0.456, 0.406], [0.229, 0.224, 0.225],
            dataset="photos", labelled=False,
        ),
    ]
}


def get(name: str) -> ZooModel:
    key = name.removeprefix("zoo:")
    if key not in MODELS:
        raise BadInput(f"unknown zoo model '{key}'{closest(key, list(MODELS))}; known: {', '.join(MODELS)}")
    return MODELS[key]
