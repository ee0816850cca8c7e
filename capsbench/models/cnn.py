"""CNN baselines: the paper's unpooled baseline and the pooled baseline capsbench compares."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from capsbench.core.config import opt
from capsbench.models.base import BenchModel, ModelOutput


class CNNClassifier(BenchModel):
    """A feature extractor and a classifier head trained with cross-entropy."""

    loss_name = "cross-entropy (attacks: cross-entropy on logits)"

    def __init__(self, features: nn.Module, head: nn.Module, input_size: int, num_classes: int) -> None:
        super().__init__()
        self.features = features
        self.head = head
        self.input_size = input_size
        self.num_classes = num_classes

    def forward(self, x: Tensor, y: Tensor | None = None) -> ModelOutput:
        return ModelOutput(self.head(self.features(x).flatten(1)).float())

    def objective(self, out: ModelOutput, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(out.scores, y)

    def attack_loss(self, out: ModelOutput, y: Tensor) -> Tensor:
        return F.cross_entropy(out.scores.float(), y, reduction="none")


@dataclass(frozen=True)
class CNNConfig:
    input_size: int = opt(28, ge=1)
    in_channels: int = opt(1, ge=1)
    num_classes: int = opt(10, ge=2)
    dropout: float = opt(0.5, ge=0, lt=1)


def paper_cnn(cfg: CNNConfig) -> CNNClassifier:
    """The paper's baseline: conv 5x5 256-256-128 (same padding, no pooling), FC 328-192, dropout.

    35,445,522 parameters at 28x28.
    """
    def conv(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 5, padding=2), nn.ReLU(inplace=True)]

    features = nn.Sequential(*conv(cfg.in_channels, 256), *conv(256, 256), *conv(256, 128))
    head = nn.Sequential(
        nn.Linear(128 * cfg.input_size**2, 328), nn.ReLU(inplace=True),
        nn.Linear(328, 192), nn.ReLU(inplace=True),
        nn.Dropout(cfg.dropout), nn.Linear(192, cfg.num_classes),
    )  # fmt: skip
    return CNNClassifier(features, head, cfg.input_size, cfg.num_classes)


POOLED_LAYERS = (
    "conv5x5(64)+ReLU+maxpool2, conv5x5(128)+ReLU+maxpool2, conv3x3(256)+ReLU+adaptive-maxpool(3x3), "
    "FC 2304->3328+ReLU, dropout 0.5, FC 3328->10"
)


def pooled_cnn(cfg: CNNConfig) -> CNNClassifier:
    """Pooled CNN baseline (conv + ReLU + max-pool blocks, dropout before the classifier).

    Layers: {layers}. 8,206,090 parameters at any input size (the last pool is adaptive to
    3x3), 0.12% fewer than CapsNet's 8,215,568; about 64M multiply-accumulates per 28x28
    image, a third of CapsNet's, so it is not the slower model of the pair.
    """
    def block(cin: int, cout: int, k: int, pool: nn.Module) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, k, padding=k // 2), nn.ReLU(inplace=True), pool]

    features = nn.Sequential(
        *block(cfg.in_channels, 64, 5, nn.MaxPool2d(2)),
        *block(64, 128, 5, nn.MaxPool2d(2)),
        *block(128, 256, 3, nn.AdaptiveMaxPool2d(3)),
    )
    head = nn.Sequential(
        nn.Linear(256 * 9, 3328), nn.ReLU(inplace=True), nn.Dropout(cfg.dropout), nn.Linear(3328, cfg.num_classes)
    )
    return CNNClassifier(features, head, cfg.input_size, cfg.num_classes)


pooled_cnn.__doc__ = (pooled_cnn.__doc__ or "").format(layers=POOLED_LAYERS)
