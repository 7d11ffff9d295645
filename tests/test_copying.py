"""copy.deepcopy / copy.copy of a compiled model (an EMA or reference model, a best-checkpoint copy) give
the same model: `.lrd` (report, freezer, save), the model's own attributes, class names, module types."""
import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torchvision

import lrd_fx
from lrd_fx.api import LRDInfo

from conftest import Branchy


def _modules(model):
    return [(name, type(m).__name__) for name, m in model.named_modules()]


def _same(a, b, x):
    assert _modules(a) == _modules(b) and type(a).__name__ == type(b).__name__
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(p is not q for p, q in zip(a.parameters(), b.parameters()))
    with torch.no_grad():
        torch.testing.assert_close(b.eval()(x), a.eval()(x), rtol=0, atol=0)


@pytest.fixture(scope="module")
def gated():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    return lrd_fx.compile(model, (x,), ratio=0.5, freeze="sequential", progress=False), x


def test_deepcopy_of_a_compiled_model_keeps_lrd_attributes_and_types(gated, tmp_path):
    gm, x = gated
    c = copy.deepcopy(gm)
    _same(gm, c, x)
    assert isinstance(c.lrd, LRDInfo) and c.lrd is not gm.lrd and c.lrd._root is c
    assert type(c).__name__ == "ResNet" and c.inplanes == gm.inplanes
    assert c.lrd.report() == gm.lrd.report()
    twice = copy.deepcopy(c)                      # a copy's copy too
    _same(gm, twice, x)
    assert twice.lrd._root is twice
    lrd_fx.save(c, tmp_path / "copy")
    loaded = lrd_fx.load(torchvision.models.resnet18(num_classes=10), tmp_path / "copy")
    _same(c, loaded, x)


def test_a_deep_copy_has_its_own_freezer_driving_its_own_gates(gated):
    gm, x = gated
    gm.lrd.freezer.set_epoch(0)
    c = copy.deepcopy(gm)
    assert c.lrd.freezer is not gm.lrd.freezer
    c.lrd.freezer.set_epoch(1)
    assert gm.lrd.freezer.epoch == 0 and c.lrd.freezer.epoch == 1
    for model, fr in ((gm, gm.lrd.freezer), (c, c.lrd.freezer)):
        model.train().zero_grad(set_to_none=True)
        model(x).sum().backward()
        frozen = {n for n, p in model.named_parameters() if p.grad is None}
        assert frozen and {f"{n}.weight" for n in fr.frozen_now()} <= frozen   # frozen_now: factor layers
    assert not set(gm.lrd.freezer.frozen_now()) & set(c.lrd.freezer.frozen_now())
    gm.zero_grad(set_to_none=True)


def test_shallow_copy_shares_modules_and_keeps_lrd(gated):
    gm, x = gated
    s = copy.copy(gm)
    assert s.lrd is gm.lrd and type(s).__name__ == "ResNet" and s.inplanes == gm.inplanes
    assert all(p is q for p, q in zip(s.parameters(), gm.parameters()))
    with torch.no_grad():
        torch.testing.assert_close(s.eval()(x), gm.eval()(x), rtol=0, atol=0)


def test_deepcopy_keeps_a_hugging_face_config_and_fused_models_lrd():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=32)).eval()
    ids = torch.randint(0, 96, (2, 8))
    gm = lrd_fx.compile(model, (ids,), ratio=0.5, progress=False)
    c = copy.deepcopy(gm)
    assert c.config.to_dict() == gm.config.to_dict() and isinstance(c.lrd, LRDInfo)
    with torch.no_grad():
        torch.testing.assert_close(c(ids).logits, gm(ids).logits, rtol=0, atol=0)
    fused = lrd_fx.fuse(gm)
    fc = copy.deepcopy(fused)
    assert isinstance(fc.lrd, LRDInfo) and fc.lrd.config.fuse_inference and fc.config is not None


def test_deepcopy_of_an_eager_root_with_traced_parts_keeps_each_parts_attributes():
    torch.manual_seed(0)
    x = torch.randn(4, 32)
    model = Branchy()
    gm = lrd_fx.compile(model, (x,), ratio=0.5, progress=False)
    parts = [(n, m) for n, m in gm.named_modules() if isinstance(m, fx.GraphModule)]
    c = copy.deepcopy(gm)
    _same(gm, c, x)
    for name, part in parts:
        got = c.get_submodule(name) if name else c
        assert sorted(got.__dict__) == sorted(part.__dict__), name


def test_other_graph_modules_keep_fx_copy_behaviour(gated):
    plain = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    plain.extra = "not kept by fx"
    assert not hasattr(copy.deepcopy(plain), "extra")


def test_a_model_pickled_whole_comes_back_with_its_class_name_and_faithful_copies(gated):
    import io
    import pickle
    gm, x = gated
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    for back in (torch.load(buf, weights_only=False), pickle.loads(pickle.dumps(gm))):
        _same(gm, back, x)
        assert isinstance(back.lrd, LRDInfo) and back.lrd._root is back and back.inplanes == gm.inplanes
        c = copy.deepcopy(back)
        _same(gm, c, x)
        assert isinstance(c.lrd, LRDInfo) and c.lrd._root is c
    eager = lrd_fx.compile(Branchy(), (torch.randn(4, 32),), ratio=0.5, progress=False)
    back = pickle.loads(pickle.dumps(eager))
    _same(eager, back, torch.randn(4, 32))


def test_pickling_a_graph_with_train_eval_dependent_values():
    # fx rebuilds a pickled GraphModule by tracing its code: the mode-dependent values stay nodes
    import pickle

    from test_export import _ModeDependent
    torch.manual_seed(0)
    x = torch.randn(8, 32)
    gm = lrd_fx.compile(_ModeDependent(), (x,), ratio=0.5, progress=False)
    back = pickle.loads(pickle.dumps(gm))
    _same(gm, back, x)
    back.train()
    with torch.no_grad():
        assert not torch.equal(back(x), back(x))


@pytest.mark.parametrize("train", [False, True])
def test_torchvision_feature_extractor_compiles_in_its_mode(train):
    """copy.deepcopy of torchvision's create_feature_extractor model (a DualGraphModule, one graph per mode)
    returns it in train mode with its train graph. The eval-mode extractor compiled into a train-mode
    model: BatchNorm on batch statistics, outputs 94% off at rank="full". The copy now takes every
    module's mode, and the graph of that mode."""
    from torchvision.models.feature_extraction import create_feature_extractor
    torch.manual_seed(0)
    model = create_feature_extractor(torchvision.models.resnet18(), {"layer2": "mid", "layer4": "out"})
    model.train(train)
    x = torch.randn(2, 3, 64, 64)
    gm = lrd_fx.compile(model, (x,), rank="full", progress=False)
    assert [m.training for m in gm.modules()] == [train] * len(list(gm.modules()))
    gm.eval(), model.eval()
    with torch.no_grad():
        got, want = gm(x), model(x)
    assert list(got) == ["mid", "out"]
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-4)


def test_pickled_model_keeps_its_state_dict_keys(tmp_path):
    """fx's rebuild of an unpickled graph traces its code again and registers tensors it reads as buffers:
    a compiled timm EVA-02 gained _tensor_constant<N> state_dict entries (48 at depth 12), so the unpickled model no longer
    took the compiled model's state_dict, and lrd_fx.save of it wrote a file load refused."""
    import timm

    from conftest import unpickled
    torch.manual_seed(0)
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, depth=3).eval()
    x = torch.randn(2, 3, 28, 28)
    gm = lrd_fx.compile(model, (x,), ratio=0.5, progress=False)
    back = unpickled(gm)
    assert set(back.state_dict()) == set(gm.state_dict())
    back.load_state_dict(gm.state_dict())
    lrd_fx.save(back, tmp_path / "m.lrd")
    loaded = lrd_fx.load(model, tmp_path / "m.lrd")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), gm(x), rtol=0, atol=0)
        torch.testing.assert_close(back(x), gm(x), rtol=0, atol=0)
