"""Small reference architectures for examples, tests and ``--arch compressor.zoo:lenet5``.

A fixed, known layout lets results be compared with the papers they come from and lets
a slim checkpoint name its base architecture by import path instead of pickling code.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DigitsNet", "LeNet5", "digits_net", "lenet5"]


class LeNet5(nn.Module):
    """LeNet-5 as laid out in the tensor-ring nets paper (IJCAI): 429,100 parameters.

    conv1 Conv2d(1,20,5,pad 2) -> ReLU -> MaxPool 2 -> conv2 Conv2d(20,50,5) -> ReLU ->
    MaxPool 2 -> flatten (50*5*5 = 1250) -> fc1 Linear(1250,320) -> ReLU -> fc2
    Linear(320,10). Input (N,1,28,28), output logits (N,10). Every stage is a module
    attribute so tracing sees each layer by name (conv1, conv2, fc1, fc2).
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, kernel_size=5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten(1)
        self.fc1 = nn.Linear(1250, 320)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(320, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.fc1(self.flatten(x)))
        return self.fc2(x)


def lenet5() -> LeNet5:
    """A freshly initialised :class:`LeNet5` (10 classes); the ``--arch`` factory."""
    return LeNet5()


class DigitsNet(nn.Module):
    """A small CNN for scikit-learn's 8x8 digits, used by tests and quick demos.

    One tiny conv (too small to gain, stays dense) and two Linear layers (512->96->10).
    """

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 64, 96)
        self.fc2 = nn.Linear(96, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def digits_net() -> DigitsNet:
    """A freshly initialised :class:`DigitsNet`; the ``--arch compressor.zoo:digits_net`` factory."""
    return DigitsNet()
