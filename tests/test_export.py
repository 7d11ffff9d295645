"""Export: a compiled model (gates stripped) runs under torch.export.export and torch.onnx.export(dynamo=True)
with the eager model's outputs."""
import pytest
import torch
import torch.nn as nn

import lrd_fx
from lrd_fx.factorize import FactorChain


def resnet18():
    import torchvision
    return torchvision.models.resnet18(num_classes=10).eval()


def small_vit():
    from torchvision.models.vision_transformer import VisionTransformer
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                             mlp_dim=64, num_classes=10).eval()


MODELS = {"resnet18": resnet18, "vit": small_vit}


def compiled(name):
    model = MODELS[name]()
    x = torch.randn(2, 3, 32, 32)
    calib = [torch.randn(4, 3, 32, 32)]
    # one-shot calibration keeps the test short; the sequential refit changes weights, not the graph
    # ResNet-18's 256/512-channel stages are left whole to keep the test short: layers 1-2 have every
    # kind of factorized conv (Tucker-2 3x3, strided, 1x1 downsample)
    gm = lrd_fx.compile(model, (x,), ratio=0.5, min_channels=8, freeze="sequential", progress=False,
                        calibration=calib, calibration_mode="oneshot", skip=("layer3.*", "layer4.*"))
    assert sum(isinstance(m, FactorChain) for m in gm.modules()) >= 2
    return lrd_fx.strip_gates(gm).eval(), x


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_and_input(request):
    torch.manual_seed(0)
    return compiled(request.param)


def test_torch_export_matches_eager(model_and_input):
    gm, x = model_and_input
    ep = torch.export.export(gm, (x,))
    x2 = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x2), gm(x2), atol=1e-5, rtol=1e-5)
    assert not any("grad_gate" in str(n.target) for n in ep.graph.nodes)


def test_onnx_export_matches_eager(model_and_input, tmp_path):
    onnx = pytest.importorskip("onnx")     # optional: `pip install onnx onnxscript` (the [export] extra)
    pytest.importorskip("onnxscript")
    gm, x = model_and_input
    path = tmp_path / "model.onnx"
    torch.onnx.export(gm, (x,), str(path), dynamo=True)
    onnx.checker.check_model(str(path))
    x2 = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = gm(x2).numpy()
    try:
        import onnxruntime as ort
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = sess.run(None, {sess.get_inputs()[0].name: x2.numpy()})[0]
    except ImportError:
        from onnx.reference import ReferenceEvaluator
        ref = ReferenceEvaluator(str(path))
        got = ref.run(None, {ref.input_names[0]: x2.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("freeze", [None, "sequential"])
def test_torch_jit_script_of_a_compiled_model(freeze, tmp_path):
    # fastcalls' `self._modules[...]` code is not TorchScript: each graph part hands TorchScript the same
    # part with fx's plain code (__prepare_scriptable__); the caller's compiled model keeps its own code.
    import io

    from lrd_fx.errors import FreezeError
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    gm = lrd_fx.compile(resnet18(), (x,), ratio=0.5, freeze=freeze, progress=False).eval()
    code = gm.code
    if freeze:
        with pytest.raises(FreezeError, match="strip_gates"):
            torch.jit.script(gm)
        gm = lrd_fx.strip_gates(gm)
    for model in (gm, lrd_fx.fuse(gm)):
        scripted = torch.jit.script(model)
        buf = io.BytesIO()
        torch.jit.save(scripted, buf)
        buf.seek(0)
        loaded = torch.jit.load(buf)
        with torch.no_grad():
            ref = model(x)
            torch.testing.assert_close(scripted(x), ref, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(loaded(x), ref, rtol=1e-5, atol=1e-6)
    assert '._modules["' in code and (freeze or gm.code == code)


def test_torch_jit_script_leaves_an_eager_roots_parts_equivalent():
    from conftest import Branchy
    torch.manual_seed(0)
    x = torch.randn(4, 32)
    gm = lrd_fx.compile(Branchy(), (x,), ratio=0.5, progress=False)
    before = {n: p for n, p in gm.named_parameters()}
    with torch.no_grad():
        ref = gm(x)
    scripted = torch.jit.script(gm)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gm(x), ref, rtol=0, atol=0)
    assert {n: p for n, p in gm.named_parameters()} == before


class _ModeDependent(nn.Module):
    """Dropout by its training flag, in the forward: the traced graph holds a train/eval-dependent value."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x):
        return self.b(torch.nn.functional.dropout(self.a(x), 0.5, self.training))


def test_torch_jit_script_keeps_train_and_eval_behaviour_of_mode_dependent_graphs():
    from lrd_fx.trace import by_mode
    torch.manual_seed(0)
    x = torch.randn(8, 32)
    gm = lrd_fx.compile(_ModeDependent(), (x,), ratio=0.5, progress=False)
    assert any(n.target is by_mode for n in gm.graph.nodes)
    scripted = torch.jit.script(gm)
    with torch.no_grad():
        torch.testing.assert_close(scripted.eval()(x), gm.eval()(x), rtol=1e-5, atol=1e-6)
        scripted.train()
        assert not torch.equal(scripted(x), scripted(x))          # dropout is on in training
    assert any(n.target is by_mode for n in gm.graph.nodes)      # the compiled model's own graph is untouched


def test_legacy_onnx_export_of_a_graph_with_a_default_traced_at_its_value(tmp_path):
    """timm's ViT is one graph with `is_causal` traced at False, checked on every call. torch.jit.trace (the
    legacy ONNX exporter, dynamo=False) hands that default in as a tensor, and the check's comparison failed
    inside TorchScript ("We don't have an op for aten::ne"). The check stands aside while jit traces; eager
    calls are still checked."""
    onnx = pytest.importorskip("onnx")
    import timm
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=16, embed_dim=32, depth=1,
                              num_heads=2).eval()
    x = torch.randn(2, 3, 32, 32)
    gm = lrd_fx.strip_gates(lrd_fx.compile(model, (x,), ratio=0.5, progress=False))
    assert gm.lrd.traced_defaults == {"is_causal": False}
    path = tmp_path / "vit.onnx"
    torch.onnx.export(gm, (x,), str(path), dynamo=False)
    onnx.checker.check_model(str(path))
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.trace(gm, (x,))(x), gm(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(lrd_fx.InputError):
        gm(x, is_causal=True)
