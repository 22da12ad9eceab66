"""The demo classifier: a small CNN for 28x28 grayscale Fashion-MNIST.

Why this shape: small enough to train on two CPU cores in about a minute, and it has the
conv/bn/relu/linear mix that pruning and int8 quantization meet in real models.
"""
from __future__ import annotations

import torch
from torch import nn


def conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FashionCNN(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(1, width), nn.MaxPool2d(2),            # 14x14
            conv_bn(width, 2 * width), nn.MaxPool2d(2),    # 7x7
            conv_bn(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(4 * width, 64), nn.ReLU(inplace=True),
                                        nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class FashionEmbedder(FashionCNN):
    """The demo classifier's 128-d pooled convolutional features (the head is left unused): an
    embedding model for the compact-feature path, with the classifier's trained weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.features(x), 1)
