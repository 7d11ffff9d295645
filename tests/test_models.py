"""Model-level sweep: real torchvision/timm architectures compile; full rank reproduces the model."""
import pytest
import torch

import lrd_fx
from lrd_fx.factorize import FactorChain
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

# one more model per family (the whole zoo runs in `python -m bench.zoo`): the smallest variant, tiny inputs.
# Checked at rank="full": exact on the output and on every factorized layer's own output (random models can
# have outputs that ignore the weights, e.g. zero-initialised heads). Compression at a ratio is checked on
# MODELS above and on the whole zoo by bench.zoo; one compile per family keeps the sweep's time small.
FAMILIES = [
    ("densenet121", {}, (1, 3, 32, 32)),
    ("efficientnet_b0", {}, (1, 3, 32, 32)),
    ("regnet_x_400mf", {}, (1, 3, 32, 32)),
    ("squeezenet1_1", {}, (1, 3, 64, 64)),
    ("shufflenet_v2_x0_5", {}, (1, 3, 32, 32)),
    ("mnasnet0_5", {}, (1, 3, 32, 32)),
    ("googlenet", {}, (1, 3, 32, 32)),            # eager aux heads: compiles through the fallback
    ("swin_t", {}, (1, 3, 32, 32)),
    ("mobilevit_xxs", {}, (1, 3, 64, 64)),
    ("levit_128s", {"img_size": 64}, (1, 3, 64, 64)),
    ("efficientvit_m0", {"img_size": 64}, (1, 3, 64, 64)),
    ("mixer_s32_224", {"img_size": 64}, (1, 3, 64, 64)),
]


def _factor_outputs(model, x, names):
    """Each named layer's output on one forward; in a compiled model a factorized layer's output is its
    last factor's (the graph calls the factors, not the chain)."""
    outs, handles = {}, []
    for n in names:
        mod = model.get_submodule(n)
        if isinstance(mod, FactorChain):
            mod = list(mod.children())[-1]
        handles.append(mod.register_forward_hook(
            lambda _m, _i, o, n=n: outs.setdefault(n, o.detach().clone())))
    with torch.no_grad():
        y = model(x)
    for h in handles:
        h.remove()
    return y, outs


@pytest.mark.parametrize("name,kwargs,shape", FAMILIES, ids=[m[0] for m in FAMILIES])
def test_family_exact_at_full_rank(name, kwargs, shape):
    model = create_model(name, **kwargs).eval()
    x = torch.randn(*shape)
    full = lrd_fx.compile(model, (x,), rank="full", progress=False).eval()
    fact = [n for n, r in full.lrd.records().items() if r.factorized]
    assert len(fact) >= 5, "too few layers were factorized"
    y_ref, ref = _factor_outputs(model, x, fact)
    assert sum(p.numel() for p in full.parameters()) > sum(p.numel() for p in model.parameters())
    y, got = _factor_outputs(full, x, fact)
    # every factorized layer the original calls in eval mode is compared (GoogLeNet's aux heads run in neither;
    # torchvision Swin's qkv/proj are called by the compiled model only: the original hands their weights to
    # F.linear)
    assert set(ref) <= set(got) and len(ref) >= 5
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    for n in ref:
        scale = ref[n].abs().max().item() + 1e-6
        torch.testing.assert_close(got[n] / scale, ref[n] / scale, rtol=1e-4, atol=1e-4, msg=n)


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
