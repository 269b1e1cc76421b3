import pytest
import torch
from torch import nn

from compressor.data import TensorLoader, load_digits_data, split_holdout
from compressor.zoo import DigitsNet


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
