"""Reference models of the TDLRT paper family: LeNet5, a small VGG and the CIFAR ResNet-18.

Plain dense ``torch.nn`` models (``nn.Conv2d`` / ``nn.Linear``), ready for
:func:`~tuckerman.integrations.torch.tuckerize`. Each builder takes the input channels, the
number of classes and the (square) image size, so the same model runs on MNIST (1×28×28) and
CIFAR-10 (3×32×32).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["MODELS", "build_model", "lenet5", "resnet18", "vgg_small"]

MODELS = ("lenet5", "vgg-small", "resnet18")


def _check_sizes(in_channels: Any, num_classes: Any, image_size: Any, owner: str) -> None:
    for value, what, minimum in (
        (in_channels, "in_channels", 1),
        (num_classes, "num_classes", 2),
        (image_size, "image_size", 1),
    ):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
            raise ValueError(f"{owner}: {what} must be an integer >= {minimum}, got {value!r}")


# --------------------------------------------------------------------------- LeNet5
class LeNet5(nn.Module):
    """LeNet5 as in the low-rank training literature (DLRT, TDLRT).

    conv 5×5 (``in_channels`` → 20), ReLU, 2×2 max-pool, conv 5×5 (20 → 50), ReLU, 2×2
    max-pool, fc (50·s·s → 500), ReLU, fc (500 → ``num_classes``); ``s = ((image_size - 4) // 2
    - 4) // 2`` (4 on MNIST: fc 800 → 500).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__()
        _check_sizes(in_channels, num_classes, image_size, "lenet5")
        side = ((image_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"lenet5: image_size must be at least 16, got {image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 20, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(50 * side * side, 500),
            nn.ReLU(),
            nn.Linear(500, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def lenet5(in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> nn.Module:
    """LeNet5: two 5×5 convolutions (20 and 50 channels) and two linear layers (500 hidden).

    Parameters
    ----------
    in_channels : int
        Image channels (1 for MNIST, 3 for CIFAR-10).
    num_classes : int
    image_size : int
        Height and width of the (square) input images, at least 16.

    Returns
    -------
    nn.Module
        A dense model mapping ``(n, in_channels, image_size, image_size)`` to ``(n,
        num_classes)`` logits.

    Examples
    --------
    >>> import torch
    >>> from tuckerman.integrations.torch import lenet5
    >>> net = lenet5()
    >>> net(torch.zeros(2, 1, 28, 28)).shape, net.classifier[1]
    (torch.Size([2, 10]), Linear(in_features=800, out_features=500, bias=True))
    """
    return LeNet5(in_channels, num_classes, image_size)


# --------------------------------------------------------------------------- VGG
def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class VGGSmall(nn.Module):
    """A small VGG: three blocks of two 3×3 conv-BN-ReLU (64, 128, 256 channels), each followed
    by 2×2 max-pooling, global average pooling, fc 256 → 256, ReLU, fc 256 → ``num_classes``."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__()
        _check_sizes(in_channels, num_classes, image_size, "vgg-small")
        if image_size < 8:
            raise ValueError(f"vgg-small: image_size must be at least 8, got {image_size}")
        layers: list[nn.Module] = []
        cin = in_channels
        for width in (64, 128, 256):
            layers += _conv_bn(cin, width) + _conv_bn(width, width) + [nn.MaxPool2d(2)]
            cin = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(256, 256),
            nn.ReLU(),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def vgg_small(in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> nn.Module:
    """A small VGG-like network (six 3×3 conv-BN-ReLU layers, 64-128-256 channels).

    Parameters
    ----------
    in_channels : int
    num_classes : int
    image_size : int
        Height and width of the input images, at least 8 (global average pooling makes the
        classifier independent of the size).

    Returns
    -------
    nn.Module

    Examples
    --------
    >>> import torch
    >>> from tuckerman.integrations.torch import vgg_small
    >>> vgg_small(3, 10, 32)(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """
    return VGGSmall(in_channels, num_classes, image_size)


# --------------------------------------------------------------------------- ResNet-18
class BasicBlock(nn.Module):
    """The two-conv residual block of ResNet-18, with a 1×1 projection shortcut when needed."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """The CIFAR-style ResNet-18 (He et al. 2016): a 3×3 stem (64 channels, stride 1, no
    max-pool), four stages of two basic blocks (64, 128, 256, 512 channels; stride 2 from the
    second stage), global average pooling and one linear classifier."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__()
        _check_sizes(in_channels, num_classes, image_size, "resnet18")
        if image_size < 8:
            raise ValueError(f"resnet18: image_size must be at least 8, got {image_size}")
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages = []
        cin = 64
        for i, width in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            stages.append(
                nn.Sequential(BasicBlock(cin, width, stride), BasicBlock(width, width, 1))
            )
            cin = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(self.pool(out), 1))


def resnet18(in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> nn.Module:
    """The CIFAR-style ResNet-18 (3×3 stem, no max-pool; 11.2M parameters for 10 classes).

    Parameters
    ----------
    in_channels : int
    num_classes : int
    image_size : int
        Height and width of the input images, at least 8.

    Returns
    -------
    nn.Module

    Examples
    --------
    >>> import torch
    >>> from tuckerman.integrations.torch import resnet18
    >>> net = resnet18(3, 10, 32)
    >>> net(torch.zeros(1, 3, 32, 32)).shape
    torch.Size([1, 10])
    """
    return ResNet18(in_channels, num_classes, image_size)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "lenet5": lenet5,
    "vgg-small": vgg_small,
    "resnet18": resnet18,
}


def build_model(
    name: str, in_channels: int = 1, num_classes: int = 10, image_size: int = 28
) -> nn.Module:
    """Build one of the reference models by name (dense; see :data:`MODELS`).

    Parameters
    ----------
    name : {"lenet5", "vgg-small", "resnet18"}
        ``"vgg_small"`` is accepted for ``"vgg-small"``.
    in_channels, num_classes, image_size : int
        As for the builders.

    Returns
    -------
    nn.Module

    Raises
    ------
    ValueError
        For an unknown name (the message lists the known ones) or bad sizes.

    Examples
    --------
    >>> import torch
    >>> from tuckerman.integrations.torch import build_model
    >>> build_model("lenet5", 3, 10, 32)(torch.zeros(1, 3, 32, 32)).shape
    torch.Size([1, 10])
    """
    key = name.replace("_", "-").lower() if isinstance(name, str) else name
    if key not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")
    return _BUILDERS[key](in_channels, num_classes, image_size)
