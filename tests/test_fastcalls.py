"""Generated code calls layers through `_modules`, not nn.Module.__getattr__ (lrd_fx/fastcalls.py)."""
import copy
import io

import pytest
import torch
import torch.nn as nn
import torchvision

import lrd_fx
from lrd_fx.fastcalls import rewrite_module_calls
from lrd_fx.pipeline import graph_modules
from tests.conftest import Wrapper


def test_rewrite_touches_module_calls_only():
    body = [
        'features_0_0 = getattr(getattr(self.features, "0"), "0")(x);  x = None\n',
        'conv1 : torch.Tensor = self.layer1.conv1(x, scale = 2)\n',
        'w = self.layer1.conv1.weight\n',                        # get_attr: no call
        'view = x.view(2, -1);  x = None\n',                     # a method of a value
        'g = getattr(self.a, "0").b(getattr(x, "shape"))\n',
        '# COUNTER: 3\n',
    ]
    out = rewrite_module_calls(body)
    assert out[0] == 'features_0_0 = self._modules["features"]._modules["0"]._modules["0"](x);  x = None\n'
    assert out[1] == 'conv1 : torch.Tensor = self._modules["layer1"]._modules["conv1"](x, scale = 2)\n'
    assert out[2:4] == body[2:4] and out[5] == body[5]
    assert out[4] == 'g = self._modules["a"]._modules["0"]._modules["b"](getattr(x, "shape"))\n'


def _getattr_calls(model, x) -> int:
    """How many times nn.Module.__getattr__ runs in one forward of `model`."""
    calls = [0]
    real = nn.Module.__getattr__

    def counted(self, name):
        calls[0] += 1
        return real(self, name)
    nn.Module.__getattr__ = counted
    try:
        with torch.no_grad():
            model(x)
    finally:
        nn.Module.__getattr__ = real
    return calls[0]


def test_compiled_model_skips_getattr_and_computes_the_same():
    model = torchvision.models.mobilenet_v3_small(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    gm = lrd_fx.compile(model, (x,), rank="full", progress=False).eval()
    plain = torch.fx.symbolic_trace(model).eval()                 # fx's own code for the same graph
    assert '._modules["features"]._modules["0"]' in gm.code and "getattr(self" not in gm.code
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-4)
    # the layer look-ups of the generated code are gone: far fewer __getattr__ calls than fx's own code
    assert _getattr_calls(gm, x) < 0.7 * _getattr_calls(plain, x)


def test_copies_pickles_and_torch_compile_keep_it_exact():
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    gm = lrd_fx.compile(model, (x,), ratio=0.5, progress=False).eval()
    with torch.no_grad():
        want = gm(x)
        twin = copy.deepcopy(gm)
        assert '_modules["layer1"]' in twin.code          # the code generator travels with the graph
        torch.testing.assert_close(twin(x), want)
        buf = io.BytesIO()
        torch.save(gm, buf)
        buf.seek(0)
        torch.testing.assert_close(torch.load(buf, weights_only=False)(x), want)
        compiled = torch.compile(gm, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), want)


def test_a_layer_replaced_after_compile_is_the_one_called():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4)))
    x = torch.randn(3, 8)
    gm = lrd_fx.compile(model, (x,), decompose_linear=False, progress=False)     # layers kept as they are
    setattr(gm.get_submodule("2"), "0", nn.Linear(8, 5))        # through nn.Module.__setattr__
    assert gm(x).shape == (3, 5)
    gm.get_submodule("2").add_module("0", nn.Linear(8, 6))     # straight into _modules
    assert gm(x).shape == (3, 6)


def test_every_traced_part_of_a_model_that_does_not_trace_whole():
    model = Wrapper()
    x = torch.randn(4, 32)
    gm = lrd_fx.compile(model, (x,), rank="full", progress=False)
    parts = graph_modules(gm)
    assert len(parts) >= 2
    calls = [p for _, p in parts if "self." in p.code and "(" in p.code]
    assert all("getattr(self" not in p.code for _, p in parts)
    assert any('self._modules[' in p.code for p in calls)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-4)


def test_fused_models_get_it_too():
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    fused = lrd_fx.fuse(lrd_fx.compile(model, (x,), ratio=0.5, progress=False))
    assert '._modules["layer1"]' in fused.code


@pytest.mark.parametrize("name", ["gpt2"])
def test_hugging_face_model(name):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 64, (2, 8))
    gm = lrd_fx.compile(model, {"input_ids": ids}, rank="full", progress=False)
    with torch.no_grad():
        torch.testing.assert_close(gm(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert all("getattr(self" not in p.code for _, p in graph_modules(gm))


def test_whole_model_timings_run_the_code_the_returned_model_runs():
    from lrd_fx.cost.timer import use_fake_clock
    seen = []

    def clock(info):
        if info.label == "lrd":
            seen.append(info.module.code)
        return 1e-3
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
    with use_fake_clock(clock):
        lrd_fx.compile(model, (torch.randn(2, 16, 8, 8),), ratio=0.5, whole_model_check=True, progress=False)
    assert seen and all('self._modules["0"]' in code for code in seen)
