"""lrd_fx.flops: the per-layer formulas agree with torch.utils.flop_counter on the layers themselves."""
import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import lrd_fx
from lrd_fx.factorize import modules as fm
from lrd_fx.flops import chain_flops, count_flops, layer_flops


def _counted(module: nn.Module, x: torch.Tensor, calls: int = 1) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        for _ in range(calls):
            module(x)
    return int(fc.get_total_flops())


def _io(x: torch.Tensor, y: torch.Tensor, calls: int = 1) -> dict:
    # the record shape_prop keeps for a layer
    return {"in": list(x.shape), "out": list(y.shape), "calls": calls}


LAYERS = [
    ("conv2d_stride", lambda: nn.Conv2d(16, 24, 3, stride=2, padding=1), (2, 16, 11, 9)),
    ("conv2d_grouped", lambda: nn.Conv2d(16, 32, 3, groups=4, padding=1), (1, 16, 7, 7)),
    ("conv1d", lambda: nn.Conv1d(8, 12, 5), (3, 8, 20)),
    ("conv3d", lambda: nn.Conv3d(4, 6, 3, padding=1, bias=False), (1, 4, 5, 6, 4)),
    ("linear_3d_input", lambda: nn.Linear(40, 24), (3, 5, 40)),
    ("linear", lambda: nn.Linear(24, 40, bias=False), (4, 24)),
]


@pytest.mark.parametrize("name,make,shape", LAYERS, ids=[c[0] for c in LAYERS])
def test_layer_flops_match_torch_counter(name, make, shape):
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(*shape)
    y = layer(x)
    assert layer_flops(layer, _io(x, y)) == _counted(layer, x) > 0
    assert layer_flops(layer, _io(x, y, calls=3)) == _counted(layer, x, calls=3)


def test_layer_flops_of_hf_conv1d():
    from transformers.pytorch_utils import Conv1D
    layer = Conv1D(48, 24)                   # out 48, in 24, weight stored [in, out]
    x = torch.randn(2, 7, 24)
    assert layer_flops(layer, _io(x, layer(x))) == _counted(layer, x) == 2 * 2 * 7 * 24 * 48


@pytest.mark.parametrize("scheme,ranks", [("tucker2", (6, 10)), ("conv_svd", (7,))])
def test_chain_flops_match_torch_counter(scheme, ranks):
    # stride 2: Tucker-2's first 1x1 runs at the input positions, every other factor at the output ones
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, stride=2, padding=1)
    chain = fm.factorize_conv(conv, ranks, scheme)
    x = torch.randn(2, 16, 12, 10)
    y = conv(x)
    assert chain(x).shape == y.shape
    assert chain_flops(chain, _io(x, y)) == _counted(chain, x)
    assert chain_flops(chain, _io(x, y, calls=2)) == _counted(chain, x, calls=2)
    if scheme == "tucker2":   # by hand: 1x1 at 12x10, core and last 1x1 at 6x5
        r_in, r_out = ranks
        assert chain_flops(chain, _io(x, y)) == 2 * 2 * (12 * 10 * 16 * r_in + 6 * 5 * (r_in * r_out * 9 + r_out * 24))


def test_chain_flops_of_a_linear_chain():
    lin = nn.Linear(40, 24)
    chain = fm.factorize_linear(lin, 5)
    x = torch.randn(3, 5, 40)
    assert chain_flops(chain, _io(x, lin(x))) == _counted(chain, x) == 2 * 15 * (40 * 5 + 5 * 24)


def test_no_io_means_no_flops():
    conv = nn.Conv2d(8, 8, 3)
    assert layer_flops(conv, None) == 0 and layer_flops(conv, {"in": None, "out": None, "calls": 1}) == 0
    chain = fm.chain_like(conv, (4, 4), "tucker2")
    assert chain_flops(chain, None) == 0 and chain_flops(chain, {"in": None, "out": [1, 8, 4, 4], "calls": 1}) == 0


def test_count_flops_keeps_the_mode_and_matches_the_records():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Flatten(), nn.Linear(32 * 6 * 6, 10)).train()
    x = torch.randn(2, 16, 6, 6)
    running = model[1].running_mean.clone()
    total = count_flops(model, (x,))
    assert model.training and torch.equal(model[1].running_mean, running)   # eval inside, mode restored
    assert total == 2 * 2 * (36 * 32 * 16 * 9 + 32 * 36 * 10)
    # the compiled model's per-layer records use the same formulas as the whole-model count
    gm = lrd_fx.compile(model, (x,), ratio=0.25, progress=False)
    recs = gm.lrd.records()
    assert sum(r.flops_before for r in recs.values()) == total
    assert sum(r.flops_after for r in recs.values()) == count_flops(gm, (x,))
    assert gm.lrd.flops_before == total and gm.lrd.flops_after == count_flops(gm, (x,))


def _hf_gpt2():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    m = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16))
    return m, (torch.randint(0, 64, (2, 8)),)


def _timm_vit():
    import timm
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8), (torch.randn(2, 3, 32, 32),)


def _tv(name):
    import torchvision
    return lambda: (getattr(torchvision.models, name)(), (torch.randn(1, 3, 64, 64),))


class _Twice(nn.Module):
    """One Linear called twice per forward, and one in a branch the example inputs never reach."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.unused = nn.Linear(32, 32), nn.Linear(32, 8), nn.Linear(32, 32)

    def forward(self, x):
        return self.b(self.a(self.a(x)).relu())


@pytest.mark.parametrize("make", [_tv("resnet18"), _tv("mobilenet_v3_small"), _timm_vit, _hf_gpt2,
                                  lambda: (_Twice(), (torch.randn(4, 32),))],
                         ids=["resnet18", "mobilenet_v3_small", "vit", "gpt2", "shared-and-unused"])
@pytest.mark.parametrize("options", [dict(ratio=0.25), dict(ratio=0.5, freeze="sequential")], ids=["plain", "gated"])
def test_compiled_flops_from_the_records_equal_torch_counter(make, options):
    """compile counts the original's FLOPs in its input check's forward and derives the compiled model's
    from the per-layer records (no second count): both equal torch's counter on the models."""
    model, x = make()
    model.eval()
    gm = lrd_fx.compile(model, x, progress=False, **options)
    assert gm.lrd.flops_before == count_flops(model, x)
    assert gm.lrd.flops_after == count_flops(gm, x) < gm.lrd.flops_before


class _Counted(nn.Module):
    """Two Linears; `runs` counts the forwards that reach `a` (eager or traced), not the trace itself."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)
        self.runs = []
        self.a.register_forward_hook(lambda m, i, o: self.runs.append(1) if not isinstance(o, torch.fx.Proxy) else None)

    def forward(self, x):
        return self.b(self.a(x).relu())


@pytest.mark.parametrize("check_inputs", [True, False])
def test_compile_runs_the_model_once_and_counts_its_flops_in_that_forward(monkeypatch, check_inputs):
    """shape_prop's forward checks the input shapes and counts the FLOPs (one forward of the model; the
    input check adds the eager forward that checks the traced graph), and the compiled model's FLOPs come
    from the records."""
    counts = []
    monkeypatch.setattr(lrd_fx.api, "count_flops", lambda *a: counts.append(1) or count_flops(*a))
    x = torch.randn(2, 32)
    model = _Counted()
    gm = lrd_fx.compile(model, (x,), ratio=0.25, progress=False, check_inputs=check_inputs)
    # (the copies' hook is the same function: it appends here)
    assert len(model.runs) == (2 if check_inputs else 1) and counts == []
    assert gm.lrd.flops_before == count_flops(model, (x,))
    assert gm.lrd.flops_after == count_flops(gm, (x,)) < gm.lrd.flops_before
    # fused models are counted after the passes
    fused = lrd_fx.compile(_Counted().eval(), (x,), ratio=0.25, progress=False, fuse_inference=True)
    assert counts == [1] and fused.lrd.flops_after == count_flops(fused, (x,))


def test_a_failing_forward_is_put_down_to_the_inputs_by_the_eager_model(monkeypatch):
    """When shape_prop's forward fails, the eager model runs on the inputs: an InputError naming their shapes
    when it fails too (no pass prefix), the pass's own error when it runs (the traced model is at fault)."""
    with pytest.raises(lrd_fx.InputError, match=r"^the model does not run on example_inputs of shape \[\(2, 31\)\]"):
        lrd_fx.compile(_Counted(), (torch.randn(2, 31),), ratio=0.25, progress=False)
    import lrd_fx.passes.shape_prop as sp

    def broken(*a, **k):
        raise RuntimeError("traced part broke")
    monkeypatch.setattr(sp, "capture_shapes", broken)
    with pytest.raises(lrd_fx.PassError, match="shape_prop.*traced part broke"):
        lrd_fx.compile(_Counted(), (torch.randn(2, 32),), ratio=0.25, progress=False)


def test_flop_counter_failure_in_the_input_check_is_a_note_not_an_error(monkeypatch):
    import torch.utils.flop_counter as fcm

    class Broken(fcm.FlopCounterMode):
        def __enter__(self):
            raise AssertionError("counter broke")
    monkeypatch.setattr(fcm, "FlopCounterMode", Broken)
    gm = lrd_fx.compile(nn.Sequential(nn.Linear(32, 32)), (torch.randn(2, 32),), ratio=0.25, progress=False)
    assert gm.lrd.flops_before is None
    assert any("FLOPs unknown" in n and "counter broke" in n for n in gm.lrd.notes)


def test_flops_of_torch_fused_attention_are_counted():
    # torch's counter has no formula for the fused eval kernels of nn.MultiheadAttention and
    # nn.TransformerEncoderLayer: counted with them off, the projections and attention are in the total
    torch.manual_seed(0)
    n, t, e, ff = 2, 10, 64, 256
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(e, 4, ff, batch_first=True), 2).eval()
    layers = 2 * n * t * (2 * e * ff + 4 * e * e)      # MLP and the four projections (the attention's own
    scores = 2 * 2 * n * t * t * e                        # matmuls: counted where torch's counter has a formula)
    assert 2 * layers <= count_flops(enc, (torch.randn(n, t, e),)) <= 2 * (layers + scores)
    assert torch.backends.mha.get_fastpath_enabled()
    gm = lrd_fx.compile(enc, (torch.randn(n, t, e),), rank="full")
    assert 2 * layers <= gm.lrd.flops_before <= 2 * (layers + scores)
