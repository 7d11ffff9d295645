"""layer_calls: F.linear of a layer's weight becomes the layer's call (then factorized like any other)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lrd_fx


class QKV(nn.Module):
    """timm BEiT/EVA style: the projection has no bias; q and v biases are parameters of their own."""

    def __init__(self, dim=32, own_bias=False, call="separate"):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=own_bias)
        self.q_bias = nn.Parameter(torch.randn(dim))
        self.v_bias = nn.Parameter(torch.randn(dim))
        self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        self.out = nn.Linear(3 * dim, dim)
        self.call = call

    def forward(self, x):
        if self.call == "separate":
            qkv = F.linear(x, weight=self.qkv.weight, bias=torch.cat((self.q_bias, self.k_bias, self.v_bias)))
        elif self.call == "own":
            qkv = F.linear(x, self.qkv.weight, self.qkv.bias)
        elif self.call == "none":
            qkv = F.linear(x, self.qkv.weight)
        else:                                  # the weight is also read for something else
            qkv = F.linear(x, self.qkv.weight) + self.qkv.weight.sum()
        return self.out(torch.relu(qkv))


def _plan(model, x, **kw):
    return lrd_fx.compile(model, (x,), **kw).lrd.plan


@pytest.mark.parametrize("call,own_bias", [("separate", False), ("own", True), ("none", False)])
def test_functional_calls_of_a_layer_are_factorized_exactly(call, own_bias):
    torch.manual_seed(0)
    model = QKV(own_bias=own_bias, call=call).eval()
    x = torch.randn(2, 5, 32)
    full = lrd_fx.compile(model, (x,), rank="full")
    with torch.no_grad():
        torch.testing.assert_close(full(x), model(x), rtol=1e-4, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want, got = model(x), full(x)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.05)
    gm = lrd_fx.compile(model, (x,), ratio=0.5)
    assert gm.lrd.plan["qkv"]["decision"] == "decomposed"
    assert any("layer_calls" in n for n in gm.lrd.notes) and "layer_calls" in gm.lrd.pass_times
    assert "qkv.weight" not in gm.code        # the graph calls the factors, it no longer reads the weight
    gm.train()
    gm(x).square().mean().backward()
    assert gm.get_submodule("qkv")[0].weight.grad is not None


def test_calls_that_are_not_the_layers_own_stay_as_they_are():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32)
    # the weight read for something else too: the layer cannot be swapped (its weight is still read)
    assert "read directly" in _plan(QKV(call="weight"), x, ratio=0.5)["qkv"]["reason"]
    # a layer with its own bias, called with another one
    model = QKV(own_bias=True, call="separate").eval()
    assert "read directly" in _plan(model, x, ratio=0.5)["qkv"]["reason"]
    with torch.no_grad():
        torch.testing.assert_close(lrd_fx.compile(model, (x,), rank="full")(x), model(x))
    # a hook on it, which the original never runs (F.linear is not a call of the layer): not made a call
    hooked = QKV().eval()
    calls = []
    hooked.qkv.register_forward_hook(lambda m, i, o: calls.append(1))
    gm = lrd_fx.compile(hooked, (x,), ratio=0.5)
    assert "qkv.weight" in gm.code and "hooks" in gm.lrd.plan["qkv"]["reason"]
    assert "layer_calls" not in gm.lrd.pass_times      # nothing to rewrite: the pass is not run
    calls.clear()
    gm(x)
    assert calls == []
    # decompose_linear=False leaves the graph as traced
    assert "qkv.weight" in lrd_fx.compile(QKV().eval(), (x,), decompose_linear=False).code


def test_layer_calls_survive_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = QKV().eval()
    x = torch.randn(2, 5, 32)
    gm = lrd_fx.compile(model, (x,), ratio=0.5)
    lrd_fx.save(gm, tmp_path / "qkv.lrd")
    for inputs in (None, (x,)):
        loaded = lrd_fx.load(model, tmp_path / "qkv.lrd", inputs)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), gm(x), rtol=0, atol=0)
