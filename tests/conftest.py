import pytest
import torch
from torch import nn

from compressor.data import TensorLoader, load_digits_data, split_holdout


class DigitsNet(nn.Module):
    """A small CNN for 8x8 digits: one tiny conv (stays dense), two Linear layers."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 64, 96)
        self.fc2 = nn.Linear(96, 10)

    def forward(self, x):
        x = torch.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture(scope="session")
def digits():
    x, y = load_digits_data()
    return split_holdout(x, y, fraction=0.2, seed=0)


@pytest.fixture(scope="session")
def trained_digits_net(digits):
    """DigitsNet trained to ~95 % on sklearn's digits (a few seconds)."""
    xtr, ytr, xte, yte = digits
    torch.manual_seed(0)
    model = DigitsNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = TensorLoader(xtr, ytr, 64, shuffle=True, seed=0)
    for _ in range(15):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


@pytest.fixture
def digits_loaders(digits):
    xtr, ytr, xte, yte = digits
    return TensorLoader(xtr, ytr, 64, shuffle=True, seed=0), TensorLoader(xte, yte, 256)
