"""fuse pass: BatchNorm folding, merging adjacent linear maps, dropping no-op nodes; exact in eval mode."""
import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import lrd_fx
from lrd_fx.passes.fuse import fold_bn_weights
from lrd_fx.pipeline import graph_modules

from conftest import state_hash


def _close(a, b):
    """Equal to rtol 1e-4, with an absolute floor scaled to the output (deep nets lose digits near 0)."""
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.detach().abs().max()))


def _randomize_bn(model):
    """Non-trivial eval statistics: a fold that ignored any of them would change the output."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model


def _call_modules(root, cls):
    return [n for _, part in graph_modules(root) for n in part.graph.nodes
            if n.op == "call_module" and isinstance(part.get_submodule(n.target), cls)]


def test_fold_bn_weights_matches_conv_then_bn():
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=True)
    bn = _randomize_bn(nn.BatchNorm2d(6)).eval()
    w, b = fold_bn_weights(conv.weight, conv.bias, bn)
    x = torch.randn(2, 4, 7, 7)
    _close(nn.functional.conv2d(x, w, b, padding=1), bn(conv(x)))


def test_resnet18_factorized_and_fused_matches_unfused():
    torchvision = pytest.importorskip("torchvision")
    model = _randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    before = state_hash(model)
    x = torch.randn(2, 3, 32, 32)
    # layers 1-2 factorized (BN folds into factor 'last' convs), layers 3-4 kept (BN folds into the
    # original convs); skipping the big layers keeps the test fast
    gm = lrd_fx.compile(model, (x,), ratio=0.25, conv_scheme="svd", skip=("layer3.*", "layer4.*"),
                        progress=False).eval()
    assert any(r.factorized for r in gm.lrd.records().values())
    fused = lrd_fx.fuse(gm)
    assert state_hash(model) == before
    with torch.no_grad():
        _close(fused(x), gm(x))
    # every BatchNorm of ResNet-18 follows a conv (a factor's 'last' 1x1 or the kept stem): all folded
    assert _call_modules(gm, nn.BatchNorm2d) and not _call_modules(fused, nn.BatchNorm2d)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert "20 BatchNorm folded" in fused.lrd.notes[-1] and not any("fuse" in n for n in gm.lrd.notes)
    # the compiled model is unchanged by fuse(); the fused copy is eval-only
    assert _call_modules(gm, nn.BatchNorm2d)
    fused.train()
    with pytest.raises(lrd_fx.ConfigError, match="fused for inference"):
        fused(x)
    fused.eval()
    # fusing again changes nothing (the pass is idempotent)
    again = lrd_fx.fuse(fused)
    assert len(again.graph.nodes) == len(fused.graph.nodes)
    with torch.no_grad():
        _close(again(x), gm(x))


def test_small_vit_fused_matches_and_drops_noops():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10, depth=2).eval()
    x = torch.randn(2, 3, 32, 32)
    gm = lrd_fx.compile(model, (x,), ratio=0.25, progress=False).eval()
    assert _call_modules(gm, (nn.Identity, nn.Dropout))
    fused = lrd_fx.compile(model, (x,), ratio=0.25, progress=False, fuse_inference=True)
    assert not fused.training
    assert not _call_modules(fused, (nn.Identity, nn.Dropout))
    with torch.no_grad():
        _close(fused(x), gm(x))
    assert any(n.startswith("fuse (inference only)") for n in fused.lrd.notes)


class TwoLinear(nn.Module):
    """Two Linear layers with nothing between them, then a nonlinearity and a head."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(torch.relu(self.b(self.a(x))))


def test_adjacent_factors_merge_only_where_cheaper():
    model = TwoLinear()
    x = torch.randn(5, 64)
    gm = lrd_fx.compile(model, (x,), ratio=0.25, progress=False).eval()
    fused = lrd_fx.fuse(gm)
    with torch.no_grad():
        _close(fused(x), gm(x))
    names = [n.target for n in fused.graph.nodes if n.op == "call_module"]
    # a.last (r -> 64) and b.first (64 -> r) merge into r -> r, which then merges into a.first: b(a(x)) is
    # one rank-r factorization 64 -> r -> 64. The head's own first -> last pair stays (merging it would
    # undo a decomposition that saves work).
    assert names == ["a.first", "b.last", "head.first", "head.last"]
    assert tuple(fused.a.first.weight.shape) == (gm.b.first.out_features, 64)
    assert sum(p.numel() for p in fused.parameters()) < sum(p.numel() for p in gm.parameters())


class ConvPairs(nn.Module):
    """kxk -> 1x1 (merge into one kxk), 1x1 -> kxk with padding (merge only without a bias on the 1x1)."""

    def __init__(self, bias_on_pointwise):
        super().__init__()
        self.k = nn.Conv2d(4, 32, 3, padding=1)
        self.p = nn.Conv2d(32, 4, 1)
        self.q = nn.Conv2d(4, 32, 1, bias=bias_on_pointwise)
        self.k2 = nn.Conv2d(32, 4, 3, padding=1, stride=2)

    def forward(self, x):
        return self.k2(self.q(torch.relu(self.p(self.k(x)))))


@pytest.mark.parametrize("bias", [False, True])
def test_conv_pairs_merge_exactly(bias):
    model = ConvPairs(bias).eval()
    x = torch.randn(2, 4, 9, 9)
    fused = lrd_fx.fuse(model)
    with torch.no_grad():
        _close(fused(x), model(x))
    convs = _call_modules(fused, nn.Conv2d)
    # k (4->32, 3x3) + p (32->4, 1x1) -> one 4->4 3x3; q + k2 only when q has no bias (zero padding)
    assert len(convs) == (3 if bias else 2)


class SharedConvBN(nn.Module):
    """The same conv feeds two BatchNorms: folding either one would change the other call."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)     # depthwise: folded too
        self.bn3 = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.bn1(self.conv(x)) + self.bn2(self.conv(x))
        return self.bn3(self.conv2(y))


def test_shared_conv_is_not_folded():
    model = _randomize_bn(SharedConvBN()).eval()
    x = torch.randn(2, 3, 8, 8)
    fused = lrd_fx.fuse(model)
    with torch.no_grad():
        _close(fused(x), model(x))
    bns = {n.target for n in _call_modules(fused, nn.BatchNorm2d)}
    assert bns == {"bn1", "bn2"}       # conv is called twice; conv2 -> bn3 is folded


class Stem(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(torch.relu(self.bn(self.conv(x))))


class EagerRoot(nn.Module):
    """Its forward branches on data (stays eager); the stem is traced on its own."""

    def __init__(self):
        super().__init__()
        self.stem = Stem()
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        if x.sum() > 0:
            x = x * 2
        return self.head(x.mean((2, 3)))


def test_eager_root_with_traced_parts():
    model = _randomize_bn(EagerRoot()).eval()
    x = torch.randn(2, 3, 8, 8)
    gm = lrd_fx.compile(model, (x,), ratio=0.5, min_channels=1, progress=False, fuse_inference=True)
    assert not isinstance(gm, fx.GraphModule) and isinstance(gm.stem, fx.GraphModule)
    assert not _call_modules(gm, (nn.BatchNorm2d, nn.Dropout))
    ref = lrd_fx.compile(model, (x,), ratio=0.5, min_channels=1, progress=False).eval()
    with torch.no_grad():
        _close(gm(x), ref(x))


def test_gated_model_is_fused_without_gates():
    model = _randomize_bn(EagerRoot()).eval()
    x = torch.randn(2, 3, 8, 8)
    gated = lrd_fx.compile(model, (x,), ratio=0.5, min_channels=1, progress=False, freeze="sequential").eval()
    fused = lrd_fx.fuse(gated)
    assert not lrd_fx.freezing.is_gated(fused) and lrd_fx.freezing.is_gated(gated)
    with torch.no_grad():
        _close(fused(x), gated(x))


def test_fuse_with_freeze_is_a_config_error():
    with pytest.raises(lrd_fx.ConfigError, match="fuse_inference"):
        lrd_fx.compile(TwoLinear(), torch.randn(2, 64), fuse_inference=True, freeze="sequential")


def test_debug_prints_the_fuse_stage(capsys):
    model = _randomize_bn(Stem()).eval()
    lrd_fx.compile(model, torch.randn(1, 3, 8, 8), ratio=0.5, min_channels=1, progress=False,
                   fuse_inference=True, debug=True)
    out = capsys.readouterr().out
    assert "graph after pass 'fuse' (modified)" in out
    fuse_stage = out.split("graph after pass 'fuse'")[1]
    assert "bn" not in fuse_stage and "drop" not in fuse_stage


def test_copy_of_fused_model_stays_eval_only():
    model = _randomize_bn(Stem()).eval()
    fused = lrd_fx.fuse(model)
    clone = copy.deepcopy(fused).train()
    with pytest.raises(lrd_fx.ConfigError, match="fused for inference"):
        clone(torch.randn(1, 3, 8, 8))
