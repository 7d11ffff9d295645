"""Shared test fixtures: deterministic seeds, small threads, a private timing cache."""
import hashlib

import pytest
import torch


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
