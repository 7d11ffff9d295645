"""Model-level sweep: real torchvision/timm architectures compile; full rank reproduces the model."""
import pytest
import torch

import lrd_fx
from lrd_fx.layers import FactorChain
from lrd_fx.models import create_model

# (name, create kwargs, input shape): small inputs keep the sweep fast on 2 CPU cores
MODELS = [
    ("resnet18", {}, (1, 3, 64, 64)),
    ("resnet50", {}, (1, 3, 64, 64)),
    ("mobilenet_v3_large", {}, (1, 3, 64, 64)),
    ("vit_small_patch16_224", {"img_size": 64}, (1, 3, 64, 64)),
    ("deit_tiny_patch16_224", {"img_size": 32}, (1, 3, 32, 32)),
    ("convnext_tiny", {}, (1, 3, 64, 64)),
    ("resnet50.a1_in1k", {}, (1, 3, 64, 64)),     # timm's ResNet-50
]


@pytest.mark.parametrize("name,kwargs,shape", MODELS, ids=[m[0] for m in MODELS])
def test_model_compiles_and_compresses(name, kwargs, shape):
    model = create_model(name, **kwargs).eval()
    x = torch.randn(*shape)
    gm = lrd_fx.compile(model, (x,), ratio=0.25)
    recs = gm.lrd.records()
    fact = [r for r in recs.values() if r.factorized]
    assert fact, "no layer was factorized"
    before = sum(r.params_before for r in fact)
    after = sum(r.params_after for r in fact)
    assert after <= 0.3 * before
    with torch.no_grad():
        y = gm(x)
    assert y.shape == model(x).shape and torch.isfinite(y).all()


@pytest.mark.parametrize("name,kwargs,shape", [
    ("resnet18", {}, (2, 3, 32, 32)),
    ("vit_small_patch16_224", {"img_size": 32, "depth": 2}, (2, 3, 32, 32)),
], ids=["resnet18", "vit_small"])
def test_full_rank_model_matches_original(name, kwargs, shape):
    model = create_model(name, **kwargs).eval()
    x = torch.randn(*shape)
    gm = lrd_fx.compile(model, (x,), rank="full").eval()
    n_orig = sum(p.numel() for p in model.parameters())
    n_new = sum(p.numel() for p in gm.parameters())
    assert n_new > n_orig                       # the rewrite happened
    assert sum(isinstance(m, FactorChain) for m in gm.modules()) > 5
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-4)
