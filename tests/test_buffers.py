"""Buffers are read by the graph on every call: what forward computes from a buffer alone is not frozen into a
constant, the compiled model keeps the buffer, and where a forward uses a buffer's value in Python the
module is traced with the buffer read as a value (fx's default), as before."""
import torch
import torch.nn as nn

import lrd_fx
from lrd_fx.factorize import FactorChain


class Scaled(nn.Module):
    """A per-channel scale kept as a buffer and transformed in forward before use (as rotary embeddings
    transform `inv_freq`): read as a value, `self.scale.float().clamp(min=0)` would be a graph constant."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.register_buffer("scale", torch.ones(8))

    def forward(self, x):
        return self.fc(x) * self.scale.float().clamp(min=0)


class Counting(Scaled):
    """Python logic on a buffer's value, which a graph read of the buffer cannot run."""

    def forward(self, x):
        if int(self.scale.numel()) > 4 and bool(self.scale.sum() > 0):
            return self.fc(x) * 2
        return self.fc(x)


def test_a_buffer_transformed_in_forward_stays_a_buffer_of_the_compiled_model():
    torch.manual_seed(0)
    model = Scaled().eval()
    x = torch.randn(2, 8)
    gm = lrd_fx.compile(model, (x,), rank="full", progress=False)
    assert isinstance(gm.fc, FactorChain)
    assert "scale" in dict(gm.named_buffers()) and not any("_tensor_constant" in n for n, _ in gm.named_buffers())
    assert gm.state_dict().keys() - {k for k in gm.state_dict() if k.startswith("fc.")} == {"scale"}
    # a later change of the buffer (load_state_dict, an in-place update) reaches the compiled model
    with torch.no_grad():
        gm.scale.fill_(3.0)
        model.scale.fill_(3.0)
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    state["scale"] = torch.full((8,), 0.5)
    gm.load_state_dict(state)
    model.scale.fill_(0.5)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_python_logic_on_a_buffer_value_still_traces_with_the_buffer_read_as_a_value():
    torch.manual_seed(0)
    model = Counting().eval()
    x = torch.randn(2, 8)
    gm = lrd_fx.compile(model, (x,), rank="full", progress=False)
    assert isinstance(gm, torch.fx.GraphModule) and not gm.lrd.fallback_parts    # traced whole, as before
    assert isinstance(gm.fc, FactorChain)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_batchnorm_models_keep_their_running_statistics_as_buffers():
    """The common buffers (BatchNorm's) are read by the graph as before: the compiled model's state_dict
    holds the original's buffer names, and recalibrated statistics are used."""
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    gm = lrd_fx.compile(model, (x,), rank="full", progress=False)
    want = {n for n, _ in model.named_buffers()}
    assert want <= {n for n, _ in gm.named_buffers()}
    assert not any("_tensor_constant" in n for n, _ in gm.named_buffers())
    with torch.no_grad():
        gm.bn1.running_var.mul_(4.0)
        model.bn1.running_var.mul_(4.0)
        torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-4)
