"""Shared test fixtures and helpers: deterministic seeds, a private timing cache, state hashes, and a
model that does not trace whole."""
import hashlib

import pytest
import torch
import torch.nn as nn


@pytest.fixture(autouse=True)
def _seed_and_cache(tmp_path, monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setenv("LRD_FX_CACHE", str(tmp_path / "timings.sqlite"))
    monkeypatch.delenv("LRD_FX_DEBUG", raising=False)


def state_hash(model: torch.nn.Module) -> str:
    """A digest of every tensor in the state_dict (and the training flag): equal iff nothing changed."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                 if v.numel() else b"")
    h.update(str(model.training).encode())
    return h.hexdigest()


class ResidualMLP(nn.Module):
    """x + fc2(relu(fc1(x))): a block of two factorizable Linears."""

    def __init__(self, c):
        super().__init__()
        self.fc1 = nn.Linear(c, 2 * c)
        self.fc2 = nn.Linear(2 * c, c)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Stack(nn.Module):
    """Layers named 0, 1, ... applied in order by a forward of its own: not an nn.Sequential, so under an
    eager parent it is traced as one nested graph (an nn.Sequential there stays a Sequential, its layers
    traced one by one)."""

    def __init__(self, *layers):
        super().__init__()
        for i, layer in enumerate(layers):
            self.add_module(str(i), layer)

    def forward(self, x):
        for layer in self.children():
            x = layer(x)
        return x


class Branchy(nn.Module):
    """Its forward branches on data: fx cannot trace it, its children can be."""

    def __init__(self):
        super().__init__()
        self.inner = Stack(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
        self.head = nn.Linear(32, 32)

    def forward(self, x):
        x = self.inner(x)
        if x.sum() > 0:            # data-dependent: this module stays eager
            x = x * 2
        return self.head(x)


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(32, 32)
        self.body = Branchy()

    def forward(self, x):
        return self.body(self.stem(x))


def unpickled(model):
    """`model` through torch.save and torch.load(weights_only=False), in memory: a whole-model pickle."""
    import io
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)
