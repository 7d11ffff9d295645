"""shape_prop pass: one run of the whole model records each part's node shapes and each layer's inputs,
outputs and call count; keyword inputs, layers called twice, eager fallback parts, failing models."""
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import lrd_fx
from lrd_fx.config import Config
from lrd_fx.context import CompileContext
from lrd_fx.passes import shape_prop as sp
from lrd_fx.pipeline import PassManager, graph_modules
from lrd_fx.trace import trace
from conftest import Wrapper


def run_shape_prop(model, *args, **kwargs):
    """Trace `model` (eager root with traced parts where it does not trace whole), run the pass through
    the PassManager; returns (root, ctx, result)."""
    root = trace(model)
    ctx = CompileContext(config=Config(), model=model, example_inputs=args, example_kwargs=kwargs)
    res = PassManager([sp.shape_prop(ctx)]).run(root)
    return root, ctx, res


def _shapes(part: fx.GraphModule) -> dict:
    return {n.name: tuple(n.meta["tensor_meta"].shape) for n in part.graph.nodes if "tensor_meta" in n.meta}


class Net(nn.Module):
    """Traces whole: conv -> BN -> flatten -> fc (the fc is called twice, on two different shapes)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        y = self.bn(self.conv(x))                    # (N, 4, 4, 2)
        y = y.flatten(1)                             # (N, 32)
        a = self.fc(y.view(-1, 8))                   # (4N, 8)
        b = self.fc(a.view(-1, 4, 8))                # (N, 4, 8): second call
        return b.sum(1)


def test_layers_record_input_output_and_calls_and_nodes_get_shapes():
    model = Net()
    x = torch.randn(2, 3, 4, 2)
    root, ctx, res = run_shape_prop(model, x)
    assert res.graph_module is root and not res.modified       # an analysis: the graph is unchanged
    io = ctx.layer_io
    assert io["conv"] == {"in": [2, 3, 4, 2], "out": [2, 4, 4, 2], "calls": 1}
    assert io["fc"] == {"in": [8, 8], "out": [8, 8], "calls": 2}     # shapes of the first call, two calls
    assert set(io) == {"conv", "fc"}                                 # BN is no factorizable layer
    shapes = _shapes(root)
    assert shapes["conv"] == (2, 4, 4, 2) and shapes["flatten"] == (2, 32) and shapes["sum_1"] == (2, 8)
    assert [s for n, s in shapes.items() if n.startswith("fc")] == [(8, 8), (2, 4, 8)]   # both call sites


def test_model_state_and_mode_are_left_as_they_were():
    model = Net().train()
    model.bn.eval()                                  # a mixed-mode model: every flag comes back as it was
    root = trace(model)
    modes = {n: m.training for n, m in root.named_modules()}
    stats = root.bn.running_mean.clone(), root.bn.num_batches_tracked.clone()
    ctx = CompileContext(config=Config(), model=model, example_inputs=(torch.randn(2, 3, 4, 2),))
    PassManager([sp.shape_prop(ctx)]).run(root)
    assert {n: m.training for n, m in root.named_modules()} == modes
    assert torch.equal(root.bn.running_mean, stats[0]) and torch.equal(root.bn.num_batches_tracked, stats[1])
    assert "forward" not in root.__dict__                              # the recording forward is gone
    y = root(torch.randn(2, 3, 4, 2))
    y.sum().backward()                                                 # runs plainly, with gradients, after
    assert root.fc.weight.grad is not None


class KwBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 10)

    def forward(self, x, *, scale=1.0, mask=None):
        h = self.proj(x) * scale
        return h if mask is None else h * mask


class KwRoot(nn.Module):
    """Does not trace (data-dependent branch): stays eager and calls its traced child with keywords."""

    def __init__(self):
        super().__init__()
        self.block = KwBlock()

    def forward(self, x, *, mask=None):
        if x.sum() > 1e9:
            x = x * 0
        return self.block(x, mask=mask, scale=2.0)


def test_keyword_inputs_of_the_root_and_of_a_part():
    model = KwRoot()
    x, mask = torch.randn(5, 6), torch.ones(5, 10)
    root, ctx, _ = run_shape_prop(model, x, mask=mask)        # the root's own keyword input
    assert type(root) is KwRoot and isinstance(root.block, fx.GraphModule)
    assert ctx.layer_io["block.proj"] == {"in": [5, 6], "out": [5, 10], "calls": 1}
    part = root.block
    # the part was called with mask=, scale= as keywords: its placeholders took them
    placeholders = {n.target: n for n in part.graph.nodes if n.op == "placeholder"}
    assert tuple(placeholders["mask"].meta["tensor_meta"].shape) == (5, 10)
    muls = [n for n in part.graph.nodes if n.op == "call_function" and n.target is operator.mul]
    assert [tuple(n.meta["tensor_meta"].shape) for n in muls] == [(5, 10), (5, 10)]   # * scale, * mask
    assert not any("not recorded" in n for n in ctx.notes)


def test_layers_in_an_eager_fallback_part_are_recorded():
    model = Wrapper()                    # body (Branchy) stays eager: body.inner traced, body.head eager
    x = torch.randn(3, 32)
    root, ctx, _ = run_shape_prop(model, x)
    parts = [p for p, _ in graph_modules(root)]
    assert "body.inner." in parts and not isinstance(root.body, fx.GraphModule)
    assert set(ctx.layer_io) == {"stem", "body.inner.0", "body.inner.2", "body.head"}
    assert ctx.layer_io["body.head"] == {"in": [3, 32], "out": [3, 32], "calls": 1}   # eager layer: hook
    assert set(_shapes(root.body.inner).values()) == {(3, 32)}


def test_a_part_whose_recording_fails_still_runs_and_is_noted(monkeypatch):
    model = Wrapper()
    x = torch.randn(3, 32)
    want = model(x)

    def broken(self, args, kwargs):
        raise RuntimeError("interpreter broke")
    monkeypatch.setattr(sp.RecordShapes, "call", broken)
    root, ctx, _ = run_shape_prop(model, x)
    notes = [n for n in ctx.notes if "not recorded" in n]
    assert len(notes) == len(graph_modules(root)) and all("interpreter broke" in n for n in notes)
    assert any("'body.inner'" in n for n in notes)
    assert _shapes(root.body.inner) == {}                     # no shapes, but the layers' hooks still ran
    assert ctx.layer_io["body.inner.0"]["calls"] == 1
    torch.testing.assert_close(root(x), want)


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x) @ torch.ones(3, 3)


def test_a_model_whose_forward_fails_gives_a_clear_error():
    model = Broken()
    x = torch.randn(2, 8)
    root = trace(model)
    ctx = CompileContext(config=Config(), model=model, example_inputs=(x,))
    with pytest.raises(lrd_fx.PassError, match=r"pass 'shape_prop' failed.*RuntimeError: mat1 and mat2 shapes"):
        PassManager([sp.shape_prop(ctx)]).run(root)
    assert "forward" not in root.__dict__ and root.training     # patched forward removed, mode restored
    # through compile, the inputs are checked first: the error names the example inputs and the fix
    with pytest.raises(lrd_fx.InputError, match=r"does not run on example_inputs of shape \[\(2, 8\)\].*mat1"):
        lrd_fx.compile(model, (x,), progress=False)


def test_without_example_inputs_nothing_is_recorded():
    model = Net()
    root = trace(model)
    ctx = CompileContext(config=Config(), model=model)
    res = PassManager([sp.shape_prop(ctx)]).run(root)
    assert not res.modified and ctx.layer_io == {} and _shapes(root) == {}
