"""Pass manager over roots with traced parts, shape_prop with keyword inputs, swapped layers keeping their
face, train/eval behaviour, and torchvision models that only trace in parts."""
import contextlib
import io
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import lrd_fx
from lrd_fx.factorize import FactorChain
from lrd_fx.factorize.modules import factorize
from lrd_fx.pipeline import PassManager, PassResult, graph_modules
from lrd_fx.trace import trace

from conftest import Wrapper


class KwBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 32)
        self.out = nn.Linear(32, 16)
        self.hidden_size = 32          # a plain attribute the parent reads

    def forward(self, x, *, scale=1.0, mask=None):
        h = torch.relu(self.proj(x)) * scale
        if mask is not None:
            h = h * mask
        return self.out(h)


class KwModel(nn.Module):
    """Its own forward does not trace (data-dependent branch); it calls its child with keyword inputs."""

    def __init__(self):
        super().__init__()
        self.block = KwBlock()
        self.head = nn.Linear(16, 16)

    def forward(self, x):
        if x.sum() > -1e9:   # data-dependent: the root stays eager
            pass
        assert self.block.hidden_size == 32
        mask = torch.ones(x.shape[0], self.block.hidden_size)
        return self.head(self.block(x, mask=mask, scale=2.0))


def test_pass_manager_runs_on_an_eager_root_and_recompiles_every_part():
    root = trace(Wrapper())
    parts = graph_modules(root)
    assert len(parts) >= 2

    def double_outputs(r):
        # edits graphs only, recompiles nothing: the manager must
        for _, part in graph_modules(r):
            out = next(n for n in part.graph.nodes if n.op == "output")
            with part.graph.inserting_before(out):
                twice = part.graph.call_function(torch.mul, (out.args[0], 2))
            out.args = (twice,)
        return PassResult(r, True)
    double_outputs.name = "double"

    x = torch.randn(3, 32)
    with torch.no_grad():
        before = root(x)
    pm = PassManager([double_outputs])
    res = pm.run(root)
    assert res.modified and res.graph_module is root
    assert all("mul" in part.code for _, part in graph_modules(root))
    with torch.no_grad():
        assert not torch.allclose(root(x), before)


def test_lint_failure_names_the_part():
    root = lrd_fx.trace.trace(KwModel())
    assert not isinstance(root, fx.GraphModule)

    def break_graph(r):
        part = r.block
        node = next(n for n in part.graph.nodes if n.op == "call_module")
        node.target = "nope"
        return PassResult(r, True)
    break_graph.name = "breaker"
    with pytest.raises(lrd_fx.PassError, match=r"pass 'breaker' failed.*block \(KwBlock\)"):
        PassManager([break_graph]).run(root)


def test_a_pass_run_without_what_it_requires_is_an_error():
    """search_ranks, freeze and calibrate work on factor chains: run without decompose they would do
    nothing silently; the PassManager names what is missing instead."""
    from lrd_fx.api import build_passes
    from lrd_fx.config import Config
    from lrd_fx.context import CompileContext
    from lrd_fx.passes.freeze import freeze
    from lrd_fx.passes.search_ranks import search_ranks

    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    ctx = CompileContext(config=Config(rank_search="infer", freeze="sequential"), model=model,
                         example_inputs=(torch.randn(2, 16),))
    for make in (search_ranks, freeze):
        with pytest.raises(lrd_fx.PassError, match=r"requires \['decompose'\]"):
            PassManager([make(ctx)]).run(trace(model))
    names = [getattr(p, "name", "") for p in build_passes(ctx)]
    for p in build_passes(ctx):         # the pass list compile builds satisfies every requirement
        for r in getattr(p, "requires", ()):
            assert names.index(r) < names.index(p.name)


def test_eager_root_with_kwargs_compiles_exact_and_debug_shows_each_part(tmp_path):
    model = KwModel()
    x = torch.randn(4, 16)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        gm = lrd_fx.compile(model, (x,), rank="full", debug=True, dump_dir=str(tmp_path), progress=False)
    assert type(gm) is KwModel and isinstance(gm.block, fx.GraphModule)
    assert gm.block.hidden_size == 32        # traced part kept its plain attribute
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)
    assert {n for n, r in gm.lrd.plan.items() if r["decision"] == "decomposed"} == {"block.proj", "block.out", "head"}
    out = buf.getvalue()
    assert "root KwModel stays eager" in out and "--- part block (KwBlock) ---" in out
    dumped = (tmp_path / "02_decompose.py").read_text()
    assert "# --- part block (KwBlock) ---" in dumped and "proj.first" in dumped
    # shapes recorded inside the part called with keyword inputs (mask=, scale=)
    nodes = {n.target: n for n in gm.block.graph.nodes if n.op == "call_module"}
    assert tuple(nodes["proj.last"].meta["tensor_meta"].shape) == (4, 32)
    assert tuple(nodes["out.last"].meta["tensor_meta"].shape) == (4, 16)
    mul = next(n for n in gm.block.graph.nodes if n.op == "call_function" and n.target is operator.mul)
    assert tuple(mul.meta["tensor_meta"].shape) == (4, 32)
    assert not any("not recorded" in n for n in gm.lrd.notes)
    assert gm.lrd.records()["block.proj"].in_shape == [4, 16]


@pytest.mark.parametrize("make,scheme,ranks", [
    (lambda: nn.Linear(12, 8), "svd", 8),
    (lambda: nn.Conv2d(6, 10, 3, stride=2, padding=1, padding_mode="reflect"), "tucker2", (6, 10)),
    (lambda: nn.Conv2d(6, 10, 3, padding=2, dilation=2), "svd", 10),
    (lambda: nn.Conv2d(6, 10, 1, stride=2, bias=False), "svd", 6),
    (lambda: nn.Conv1d(4, 5, 3), "tucker2", (4, 5)),
    (lambda: nn.Conv3d(4, 6, 3, padding=1).double(), "tucker2", (4, 6)),
], ids=["linear", "conv2d_tucker", "conv2d_svd", "conv1x1", "conv1d", "conv3d_f64"])
def test_factor_chain_keeps_the_layers_face(make, scheme, ranks):
    torch.manual_seed(0)
    layer = make()
    chain = factorize(layer, ranks, scheme)
    if isinstance(layer, nn.Linear):
        attrs = ["in_features", "out_features"]
        assert not hasattr(chain, "stride") and not hasattr(chain, "in_channels")
    else:
        attrs = ["in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode"]
        assert not hasattr(chain, "in_features")
    for a in attrs:
        assert getattr(chain, a) == getattr(layer, a), a
    w = chain.weight
    assert w.dtype == layer.weight.dtype and w.device == layer.weight.device and w.shape == layer.weight.shape
    torch.testing.assert_close(w, layer.weight, rtol=1e-4, atol=1e-5)   # full rank: the product is the weight
    assert (chain.bias is None) == (layer.bias is None)
    if layer.bias is not None:
        assert torch.equal(chain.bias, layer.bias)
    w.sum().backward()                        # the product is differentiable w.r.t. the factors
    assert chain.first.weight.grad is not None


def test_hf_conv1d_chain_keeps_its_layout():
    tf = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D
    layer = Conv1D(24, 16)                     # nf=24 outputs, nx=16 inputs, weight [in, out]
    nn.init.normal_(layer.weight)
    chain = factorize(layer, 16, "svd")
    assert (chain.nf, chain.nx) == (24, 16) and (chain.in_features, chain.out_features) == (16, 24)
    torch.testing.assert_close(chain.weight, layer.weight, rtol=1e-4, atol=1e-5)


class ReadsChild(nn.Module):
    """Reads attributes of its layers in forward, as Whisper (conv1.stride) and T5 (wo.weight.dtype) do;
    the data-dependent assert keeps it eager."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(16, 32, 3, stride=2, padding=1)
        self.wo = nn.Linear(32, 16)

    def forward(self, x):
        y = self.conv(x)
        assert y.shape[-1] == (x.shape[-1] + 2 * self.conv.padding[0] - 3) // self.conv.stride[0] + 1
        y = y.transpose(1, 2)
        if y.dtype != self.wo.weight.dtype:
            y = y.to(self.wo.weight.dtype)
        return self.wo(y)


class GraphReadsWeight(nn.Module):
    """Traces whole; its graph reads a layer's weight (values used) and leaves another read unused."""

    def __init__(self):
        super().__init__()
        self.wi = nn.Linear(16, 32)
        self.wo = nn.Linear(32, 16)

    def forward(self, x):
        unused = self.wi.weight      # a dead get_attr in the graph, as T5's dtype check leaves
        return self.wo(torch.relu(self.wi(x))) + self.wo.weight.sum(1)


def test_eager_reads_of_a_swapped_layer_keep_working():
    model = ReadsChild()
    x = torch.randn(2, 16, 9)
    gm = lrd_fx.compile(model, (x,), rank="full", min_channels=1, progress=False)
    assert "<root>" in gm.lrd.fallback_parts
    assert gm.lrd.plan["conv"]["decision"] == "decomposed" and gm.lrd.plan["wo"]["decision"] == "decomposed"
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)


def test_graph_reads_of_a_swapped_layer_weight():
    model = GraphReadsWeight()
    x = torch.randn(3, 16)
    gm = lrd_fx.compile(model, (x,), rank="full", progress=False)
    assert isinstance(gm, fx.GraphModule)
    assert {n for n, r in gm.lrd.plan.items() if r["decision"] == "decomposed"} == {"wi", "wo"}
    reads = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    assert reads == ["wo.weight"]                       # the unused read of wi.weight was dropped
    assert any("reads 'wo.weight'" in n for n in gm.lrd.notes)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)
    gm(x).sum().backward()                              # the product carries gradients to the factors
    assert gm.wo.first.weight.grad is not None


def _outputs(o):
    return list(o) if isinstance(o, tuple) else [o]


@pytest.mark.parametrize("name,size,kind", [("googlenet", 64, "GoogLeNetOutputs"),
                                            ("inception_v3", 299, "InceptionOutputs")])
def test_aux_heads_follow_train_and_eval_mode(name, size, kind):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10, aux_logits=True, init_weights=False)
    x = torch.randn(2, 3, size, size)
    model.eval()   # compiled in eval mode: the train-mode aux heads must survive
    gm = lrd_fx.compile(model, (x,), rank="full", progress=False, filter_fn=lambda n, m: isinstance(m, nn.Linear))
    assert "self.training" in gm.lrd.fallback_parts["<root>"]
    assert sum(r["decision"] == "decomposed" for r in gm.lrd.plan.values()) >= 2
    for mode in (True, False):
        model.train(mode)
        gm.train(mode)
        torch.manual_seed(1)
        want = model(x)
        torch.manual_seed(1)
        got = gm(x)
        assert type(got).__name__ == type(want).__name__ == (kind if mode else "Tensor")
        for a, b in zip(_outputs(got), _outputs(want)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_train_only_dropout_constants_become_mode_nodes():
    class Drop(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 16)

        def forward(self, x):
            return F.dropout(self.lin(x), p=0.5 if self.training else 0.0, training=self.training)

    model = Drop()
    x = torch.randn(64, 16)
    gm = lrd_fx.compile(model, (x,), rank="full", progress=False)
    assert isinstance(gm, fx.GraphModule) and gm.lrd.fallback_parts == {}
    gm.eval(), model.eval()
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)
    gm.train(), model.train()
    torch.manual_seed(3)
    got = gm(x)
    torch.manual_seed(3)
    torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-5)
    assert (got == 0).float().mean() > 0.3    # dropout really on in train mode


def test_mode_dependent_graph_without_fallback_is_a_trace_error():
    model = torchvision.models.googlenet(num_classes=10, aux_logits=True, init_weights=False)
    with pytest.raises(lrd_fx.TraceError, match="self.training"):
        lrd_fx.compile(model, (torch.randn(1, 3, 64, 64),), fallback=False, progress=False,
                       filter_fn=lambda n, m: False, check_inputs=False)


def test_detection_model_with_a_list_of_images_compiles_through_the_fallback():
    from torchvision.models import detection
    torch.manual_seed(0)
    model = detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=5, min_size=64, max_size=96,
        rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=20, box_detections_per_img=10).eval().double()
    images = [torch.rand(3, 64, 80, dtype=torch.float64), torch.rand(3, 72, 64, dtype=torch.float64)]
    # the 12544x1024 box-head layer is left out only to keep this test quick
    gm = lrd_fx.compile(model, (images,), rank="full", progress=False, skip=["roi_heads.box_head.fc6"])
    assert "<root>" in gm.lrd.fallback_parts
    assert sum(r["decision"] == "decomposed" for r in gm.lrd.plan.values()) >= 40
    with torch.no_grad():
        want, got = model(images), gm(images)
    for a, b in zip(want, got):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)


def test_segmentation_model_compiles_exact_at_full_rank():
    from torchvision.models import segmentation
    torch.manual_seed(0)
    model = segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=5).eval()
    x = torch.rand(1, 3, 48, 48)
    gm = lrd_fx.compile(model, (x,), rank="full", progress=False)
    assert sum(r["decision"] == "decomposed" for r in gm.lrd.plan.values()) >= 30
    with torch.no_grad():
        want, got = model(x), gm(x)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)


class DropPathLike(nn.Module):
    """No layer inside; its forward branches on self.training (as timm's DropPath does)."""

    def forward(self, x):
        if not self.training:
            return x
        keep = x.new_empty((x.shape[0], 1)).bernoulli_(0.5)
        return x * keep / 0.5


class ResidualBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.drop_path = DropPathLike()
        self.table = torch.arange(16.0)      # read by the graph as a tensor constant

    def forward(self, x):
        return x + self.drop_path(self.fc2(torch.relu(self.fc1(x + self.table))))


def test_small_mode_dependent_modules_become_leaves_and_the_parent_stays_one_graph():
    model = ResidualBlock()
    x = torch.randn(8, 16)
    gm = lrd_fx.compile(model, (x,), rank="full", progress=False)
    assert isinstance(gm, fx.GraphModule) and gm.lrd.fallback_parts == {}
    assert any(n.op == "call_module" and n.target == "drop_path" for n in gm.graph.nodes)
    assert not any(k.startswith("_tensor_constant") for k in vars(model))   # tracing left the model alone
    for mode in (False, True):
        model.train(mode), gm.train(mode)
        torch.manual_seed(5)
        want = model(x)
        torch.manual_seed(5)
        torch.testing.assert_close(gm(x), want, rtol=1e-4, atol=1e-5)
