"""freeze pass: gate structure in the graph, numeric equivalence, gradients, strip_gates, nested/eager parts."""

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import lrd_fx
from lrd_fx.config import Config
from lrd_fx.context import CompileContext
from lrd_fx.errors import FreezeError
from lrd_fx.factorize.modules import factorize_conv, factorize_linear
from lrd_fx.freezing import FreezeController, FreezerLink, GatedLinear, grad_gate, is_gated
from lrd_fx.factorize import FactorChain
from lrd_fx.passes.freeze import freeze
from lrd_fx.passes.gates import strip_gates
from lrd_fx.pipeline import PassManager
from lrd_fx.plan import DECOMPOSED, LayerRecord
from lrd_fx.trace import LRDTracer
from conftest import Wrapper


class Toy(nn.Module):
    """Tucker-2 conv (reflect padding), an unfactorized conv + BN, a conv_svd conv1d path, an SVD head."""

    def __init__(self):
        super().__init__()
        self.conv = factorize_conv(nn.Conv2d(8, 16, 3, padding=1, padding_mode="reflect"), (4, 6), "tucker2")
        self.bn = nn.BatchNorm2d(16)
        self.plain = nn.Conv2d(16, 16, 1)          # not factorized: never gated
        self.c1 = factorize_conv(nn.Conv1d(16, 12, 3, stride=2, padding=1, bias=False), (5,), "svd")
        self.head = factorize_linear(nn.Linear(12, 10), 4)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = self.plain(x)
        x = x.flatten(2)                           # (N, 16, H*W)
        x = self.c1(x).mean(-1)
        return self.head(x)


def hand_built(model: nn.Module) -> tuple[fx.GraphModule, CompileContext]:
    """Trace and annotate factor nodes as the decompose pass does (meta lrd / lrd_role)."""
    gm = fx.GraphModule(model, LRDTracer().trace(model))   # Conv/Linear (subclasses too) stay leaves
    for name, child in model.named_children():
        setattr(gm, name, child)      # symbolic_trace turns FactorChains into plain Modules: put them back
    ctx = CompileContext(config=Config().replace(freeze="sequential"), model=model)
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        parent, _, role = node.target.rpartition(".")
        chain = gm.get_submodule(parent) if parent else None
        if isinstance(chain, FactorChain):
            rec = ctx.records.setdefault(parent, LayerRecord(name=parent, kind=chain.source,
                                                            scheme=chain.scheme, decision=DECOMPOSED))
            node.meta["lrd"] = rec
            node.meta["lrd_role"] = role
    return gm, ctx


def _gates(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is grad_gate]


def run_freeze(ctx, gm):
    """The freeze pass on a hand-built decomposed graph, then what the PassManager does after every pass
    (lint and recompile each part). The manager itself would refuse freeze without its decompose pass."""
    res = freeze(ctx)(gm)
    PassManager([]).finish(res.graph_module)
    return res


def _factor_calls(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_module" and "lrd_role" in n.meta]


def test_gates_replace_factor_calls_and_are_visible():
    model = Toy()
    gm, ctx = hand_built(model)
    assert len(_factor_calls(gm)) == 7
    res = run_freeze(ctx, gm)
    gm = res.graph_module
    assert res.modified
    assert _factor_calls(gm) == []
    # one gate per factor weight, plus the two biases (Tucker-2 last, SVD head last)
    keys = [n.args[2] for n in _gates(gm)]
    assert sorted(set(keys)) == sorted(["conv.first", "conv.core", "conv.last", "c1.first", "c1.last",
                                        "head.first", "head.last"])
    assert len(keys) == 9
    # the factor calls became functional calls on gated weights: 3 conv2d (Tucker-2), 2 conv1d, 2 linear
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (F.conv2d, F.conv1d, F.linear)]
    assert sorted(n.target.__name__ for n in calls) == ["conv1d"] * 2 + ["conv2d"] * 3 + ["linear"] * 2
    assert all(n.args[1].target is grad_gate for n in calls)      # each weight comes through a gate
    assert "grad_gate" in gm.code
    # reflect padding is done by an explicit pad before the gated core conv
    assert any(n.target is F.pad and n.kwargs.get("mode") == "reflect" for n in gm.graph.nodes)
    # non-factor layers stay modules
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["bn", "plain"]
    assert isinstance(gm.lrd_freezer, FreezeController) and ctx.freezer is gm.lrd_freezer
    assert list(gm.lrd_freezer.factors["conv.core"]) == ["conv", "core", "tucker2"]
    assert "lrd_freezer.current_epoch" in gm.state_dict()


@pytest.mark.parametrize("epoch", [0, 1])
def test_gated_graph_computes_the_same(epoch):
    model = Toy().eval()
    x = torch.randn(2, 8, 7, 7)
    gm, ctx = hand_built(model)
    gm = run_freeze(ctx, gm).graph_module.eval()
    gm.lrd_freezer.set_epoch(epoch)
    torch.testing.assert_close(gm(x), model(x))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    gm(xa).square().sum().backward()
    model(xb).square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)   # input gradients flow through frozen factors


def test_frozen_factors_get_no_grad_and_others_do():
    model = Toy()
    gm, ctx = hand_built(model)
    gm = run_freeze(ctx, gm).graph_module
    fr = gm.lrd_freezer
    for epoch in (0, 1):
        gm.zero_grad(set_to_none=True)
        fr.set_epoch(epoch)
        gm(torch.randn(2, 8, 7, 7)).sum().backward()
        frozen = set(fr.frozen_now())
        assert frozen and set(fr.trainable_now()) and not frozen & set(fr.trainable_now())
        for name, p in gm.named_parameters():
            owner = name.rpartition(".")[0]
            if owner in frozen:
                assert p.grad is None, name
            else:
                assert p.grad is not None and p.grad.abs().sum() > 0, name
    # phase 0 freezes the Tucker-2 core and SVD "last" factors; phase 1 the other side
    fr.set_epoch(0)
    assert sorted(fr.frozen_now()) == ["c1.last", "conv.core", "head.last"]
    fr.set_epoch(1)
    assert sorted(fr.frozen_now()) == ["c1.first", "conv.first", "conv.last", "head.first"]


def test_strip_gates_returns_an_ungated_copy():
    model = Toy().eval()
    x = torch.randn(2, 8, 7, 7)
    gm, ctx = hand_built(model)
    gm = run_freeze(ctx, gm).graph_module.eval()
    before = gm.code
    plain = strip_gates(gm)
    assert gm.code == before and is_gated(gm)                 # the given model is untouched
    assert not is_gated(plain) and not hasattr(plain, "lrd_freezer")
    assert _gates(plain) == [] and "grad_gate" not in plain.code and "pad" not in plain.code
    assert _factor_calls(plain) == ["conv.first", "conv.core", "conv.last", "c1.first", "c1.last",
                                    "head.first", "head.last"]
    assert isinstance(plain.get_submodule("conv"), FactorChain)
    assert set(plain.state_dict()) == set(gm.state_dict()) - {"lrd_freezer.current_epoch"}
    torch.testing.assert_close(plain(x), gm(x))
    node = next(n for n in plain.graph.nodes if n.target == "conv.core")
    assert node.meta["lrd_role"] == "core" and node.meta["lrd"].name == "conv"


def test_gating_twice_is_refused():
    gm, ctx = hand_built(Toy())
    gm = run_freeze(ctx, gm).graph_module
    with pytest.raises(FreezeError, match="already has freezing gates"):
        run_freeze(ctx, gm)


def test_non_plain_factor_is_left_ungated_with_a_note():
    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 1.0

    model = Toy()
    model.head.last = MyLinear(4, 10)
    gm, ctx = hand_built(model)
    gm = run_freeze(ctx, gm).graph_module
    assert "head.last" not in gm.lrd_freezer.factors
    assert "head.last" in _factor_calls(gm)
    assert sum("head.last" in n and "left ungated" in n for n in ctx.notes) == 1


def test_compile_with_freeze_sequential_sets_freezer():
    model = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Flatten(), nn.Linear(32 * 4 * 4, 10))
    x = torch.randn(2, 8, 4, 4)
    gm = lrd_fx.compile(model, (x,), rank="full", freeze="sequential", freeze_period=2)
    fr = gm.lrd.freezer
    assert isinstance(fr, FreezeController) and fr is gm.lrd_freezer
    assert fr.schedule.period == 2
    assert len(_gates(gm)) == 3 + 1 + 2 + 1        # Tucker-2 (3 + bias) and SVD Linear (2 + bias)
    torch.testing.assert_close(gm.eval()(x), model.eval()(x), rtol=1e-4, atol=1e-4)
    plain = lrd_fx.compile(model, (x,), rank="full", freeze=None)
    assert _gates(plain) == [] and plain.lrd.freezer is None


def test_nested_graphs_and_eager_parts_are_gated():
    model = Wrapper()
    x = torch.randn(4, 32)
    gm = lrd_fx.compile(model, (x,), rank=8, freeze="sequential")
    fr = gm.lrd.freezer
    assert isinstance(gm.body.inner, fx.GraphModule)
    assert isinstance(gm.body.inner.lrd_freezer, FreezerLink)
    assert _gates(gm.body.inner)                                    # gates in the nested graph
    assert isinstance(gm.get_submodule("body.head.first"), GatedLinear)   # eager chain: gated class
    assert sorted(fr.factors) == sorted(f"{n}.{r}" for n in ("stem", "body.inner.0", "body.inner.2", "body.head")
                                        for r in ("first", "last"))
    # the controller's buffer appears once in the state_dict
    assert [k for k in gm.state_dict() if "current_epoch" in k] == ["lrd_freezer.current_epoch"]
    for epoch in (0, 1):
        gm.zero_grad(set_to_none=True)
        fr.set_epoch(epoch)
        gm(x).sum().backward()
        grads = {n.rpartition(".")[0] for n, p in gm.named_parameters() if p.grad is not None}
        assert grads == set(fr.trainable_now())
    plain = strip_gates(gm)
    assert not is_gated(plain) and type(plain.get_submodule("body.head.first")) is nn.Linear
    assert not hasattr(plain.body.inner, "lrd_freezer")
    assert isinstance(gm.get_submodule("body.head.first"), GatedLinear)    # original untouched
    torch.testing.assert_close(plain(x), gm(x))
