"""Hooks on modules survive compile (a hooked module is called as a module and kept eager, its children
traced), and a traced part whose graph computes something else than its module on the example inputs is
kept eager (timm's FeatureHookNet, whose traced graph returned an empty list)."""
import pytest
import timm
import torch
import torch.nn as nn

import lrd_fx
from conftest import ResidualMLP as Block
from lrd_fx.factorize import FactorChain
from lrd_fx.passes.shape_prop import _difference


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(16, 32)
        self.blocks = nn.Sequential(Block(32), Block(32), Block(32))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def test_forward_pre_and_backward_hooks_on_blocks_still_run():
    torch.manual_seed(0)
    model = Net()
    seen = {"fwd": [], "pre": 0, "bwd": 0, "root": 0}
    model.blocks[1].register_forward_hook(lambda m, i, o: seen["fwd"].append(o))
    model.blocks[0].register_forward_pre_hook(lambda m, i: seen.__setitem__("pre", seen["pre"] + 1))
    model.blocks[2].register_full_backward_hook(lambda m, gi, go: seen.__setitem__("bwd", seen["bwd"] + 1))
    x = torch.randn(4, 16)
    gm = lrd_fx.compile(model, (x,), rank="full", progress=False)
    # the hooks saw real tensors while compiling, never a tracing Proxy
    assert all(type(o) is torch.Tensor for o in seen["fwd"])
    for path, kind in (("blocks.0", "forward pre"), ("blocks.1", "forward"), ("blocks.2", "backward")):
        assert gm.lrd.fallback_parts[path].startswith(f"has {kind} hooks")
        assert isinstance(gm.get_submodule(path).fc1, FactorChain)     # its layers still factorized
    seen.update(fwd=[], pre=0, bwd=0)
    out = gm(x.requires_grad_())
    out.sum().backward()
    assert (len(seen["fwd"]), seen["pre"], seen["bwd"]) == (1, 1, 1)
    torch.testing.assert_close(seen["fwd"][0], model.blocks[1](model.blocks[0](model.stem(x))),
                               rtol=1e-4, atol=1e-5)


def test_a_hook_that_changes_the_output_is_applied():
    torch.manual_seed(0)
    model = Net().eval()
    model.blocks.register_forward_hook(lambda m, i, o: o * 0 + 1)      # replaces the blocks' output
    x = torch.randn(2, 16)
    gm = lrd_fx.compile(model, (x,), rank="full", progress=False)
    assert isinstance(gm.blocks, nn.Sequential) and gm.blocks._forward_hooks
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    # a root with a hook stays the root: the hook is still there
    model2 = Net().eval()
    model2.register_forward_hook(lambda m, i, o: -o)
    gm2 = lrd_fx.compile(model2, (x,), rank="full", progress=False)
    assert "has forward hooks" in gm2.lrd.fallback_parts["<root>"]
    with torch.no_grad():
        torch.testing.assert_close(gm2(x), model2(x), rtol=1e-5, atol=1e-5)


class Collector:
    """Collects outputs in forward hooks, as timm's FeatureHooks does (a bound method: a copy of the model
    hooks into the copied collector)."""

    def __init__(self, modules):
        self.out = []
        for m in modules:
            m.register_forward_hook(self._hook)

    def _hook(self, mod, inputs, output):
        self.out.append(output)

    def take(self):
        out, self.out = self.out, []
        return out


class HookFeatures(nn.Module):
    """Its forward returns what the hooks collected: tracing it gives a graph that returns a constant."""

    def __init__(self):
        super().__init__()
        self.body = Net()
        self.collect = Collector([self.body.blocks[0], self.body.blocks[2]])

    def forward(self, x):
        self.body(x)
        return self.collect.take()


def test_traced_graph_that_returns_something_else_is_kept_eager():
    torch.manual_seed(0)
    model = HookFeatures().eval()
    x = torch.randn(2, 16)
    gm = lrd_fx.compile(model, (x,), rank="full", progress=False)
    assert gm.lrd.kept_eager[""].startswith(
        "kept eager: its traced graph computes something else than the module on the example inputs: "
        "output has 0 items, the module's 2")
    with torch.no_grad():
        got, want = gm(x), model(x)
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    with pytest.raises(lrd_fx.TraceError, match="computes something else"):
        lrd_fx.compile(model, (x,), rank="full", fallback=False, progress=False)


def test_timm_hook_feature_net_returns_its_features(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", features_only=True, feature_cls="hook").eval()
    x = torch.randn(2, 3, 32, 32)
    gm = lrd_fx.compile(model, (x,), ratio=0.5, progress=False)
    with torch.no_grad():
        got, want = gm(x), model(x)
    assert [t.shape for t in got] == [t.shape for t in want] and len(want) == 5
    lrd_fx.save(gm, tmp_path / "f.safetensors")
    loaded = lrd_fx.load(model, tmp_path / "f.safetensors")          # without inputs: the file says what stays eager
    with torch.no_grad():
        for a, b in zip(loaded(x), got):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("got, want, expected", [
    (torch.ones(2), torch.ones(2), None),
    (torch.ones(2) * (1 + 1e-6), torch.ones(2), None),
    (torch.ones(2) * 1.1, torch.ones(2), "output has other values"),
    (torch.ones(3), torch.ones(2), "output is torch.float32 (3,)"),
    ([], [torch.ones(1)], "output has 0 items, the module's 1"),
    ({"a": torch.ones(1)}, {"b": torch.ones(1)}, "output has keys ['a']"),
    ((torch.ones(1), 3), (torch.ones(1), 4), "output[1] is 3, the module's 4"),
    (torch.tensor([float("nan")]), torch.tensor([float("nan")]), None),
    (None, torch.ones(1), "output is a NoneType"),
])
def test_output_difference(got, want, expected):
    why = _difference(got, want)
    assert (why is None) if expected is None else why.startswith(expected)


class _Sampler(nn.Module):
    """A graph that is right but draws torch random numbers in eval mode (a VAE's sampling, SpeechT5's
    decoder prenet's consistent dropout)."""

    def __init__(self):
        super().__init__()
        self.mu, self.logvar = nn.Linear(16, 8), nn.Linear(16, 8)

    def forward(self, x):
        mu = self.mu(x)
        return mu + torch.randn_like(mu) * torch.exp(0.5 * self.logvar(x))


class _AutocastParent(nn.Module):
    """An eager parent (data-dependent branch) that runs its traced child under bf16 autocast."""

    def __init__(self):
        super().__init__()
        self.b = Block(16)

    def forward(self, x):
        if x.sum() > -1e9:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.b(x).float()
        return x


@pytest.mark.parametrize("make, x", [(lambda: nn.Sequential(nn.Linear(4, 16), _Sampler()), torch.randn(2, 4)),
                                     (_AutocastParent, torch.randn(2, 16))])
def test_random_numbers_and_the_callers_autocast_are_not_a_difference(make, x):
    torch.manual_seed(0)
    gm = lrd_fx.compile(make().eval(), (x,), rank="full", progress=False)
    assert gm.lrd.kept_eager == {}


def test_hook_registered_after_compile_on_a_module_the_graph_does_not_call_warns():
    """The compiled graph calls a block's layers (and a factor chain's factors) one by one, so a forward
    hook registered on the block after compile never ran, silently (Grad-CAM on `gm.layer4` collected
    nothing). Registering one there warns now, naming the module; it is still registered (the handle
    removes it). A hook on a module the graph calls (a BatchNorm) runs, without a warning."""
    import warnings
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    gm = lrd_fx.compile(model, (x,), ratio=0.5, progress=False)
    seen = []
    block, bn = gm.get_submodule("layer4"), gm.get_submodule("layer4.1.bn2")
    chain = gm.get_submodule("layer4.1.conv2")
    assert isinstance(chain, FactorChain)
    for module, path in ((block, "layer4"), (chain, "layer4.1.conv2")):
        with pytest.warns(UserWarning, match=f"module '{path}' .* will never run"):
            handle = module.register_forward_hook(lambda m, i, o: seen.append(path))
        assert len(module._forward_hooks) == 1
        handle.remove()
    with pytest.warns(UserWarning, match="forward pre-hook will never run"):
        block.register_forward_pre_hook(lambda m, i: None).remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bn.register_forward_hook(lambda m, i, o: seen.append("bn"))
    gm(x)
    assert seen == ["bn"]


def test_hook_on_a_gated_factor_layer_warns_and_runs_again_after_strip_gates():
    """With freeze=, the graph reads a factor layer's weights through its gate (F.linear(x, grad_gate(w)))
    and does not call the layer, so a hook registered on the layer never ran, and nothing said so. It
    warns now; strip_gates calls the factors again, and there a hook runs without a warning."""
    import warnings

    from lrd_fx import strip_gates
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    x = torch.randn(4, 32)
    gm = lrd_fx.compile(model, (x,), ratio=0.5, freeze="sequential", progress=False)
    factor = gm.get_submodule("0.first")
    seen = []
    with pytest.warns(UserWarning, match="module '0.first' .* reads this layer's weights instead of calling it "
                                         ".* will never run"):
        factor.register_forward_hook(lambda m, i, o: seen.append("gated"))
    gm(x)
    assert seen == []
    plain = strip_gates(gm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain.get_submodule("0.first").register_forward_hook(lambda m, i, o: seen.append("plain"))
    plain(x)
    assert seen.count("plain") == 1
