"""Parts traced apart whose graph is wrong for their real call: a part kept eager and traced again when its
graph fails on the inputs, dataclass/OrderedDict outputs kept as their class, and the input check run on
an eager model."""
import collections
import dataclasses

import pytest
import torch
import torch.nn as nn

import lrd_fx
from lrd_fx import api
from lrd_fx.errors import InputError, TraceError
from lrd_fx.factorize import FactorChain
from lrd_fx.pipeline import graph_modules


class Emb(nn.Module):
    """Called with embeds=None; traced apart, fx takes `embeds` as given and the graph fails on None."""

    def __init__(self):
        super().__init__()
        self.e = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 32)

    def forward(self, ids, embeds=None):
        if embeds is None:
            embeds = self.e(ids)
        return self.proj(embeds)


class NoneArgModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = Emb()
        self.head = nn.Linear(32, 32)

    def forward(self, ids):
        h = self.emb(ids, embeds=None)
        if h.sum() > -1e9:          # data-dependent: the root does not trace, `emb` is traced apart
            h = self.head(h)
        return h


def _none_arg_model():
    torch.manual_seed(0)
    return NoneArgModel().eval(), (torch.randint(0, 50, (2, 8)),)


def test_part_whose_graph_fails_is_kept_eager_and_its_layers_still_factorized(capsys):
    model, x = _none_arg_model()
    full = lrd_fx.compile(model, x, rank="full", progress=False)
    with torch.no_grad():
        torch.testing.assert_close(full(*x), model(*x), rtol=1e-5, atol=1e-6)
    gm = lrd_fx.compile(model, x, ratio=0.5, progress=False)
    assert set(gm.lrd.kept_eager) == {"emb"}
    reason = gm.lrd.fallback_parts["emb"]
    assert reason.startswith("kept eager: its traced graph failed") and "NoneType" in reason
    assert isinstance(gm.emb.proj, FactorChain) and isinstance(gm.head, FactorChain)
    assert not isinstance(gm.emb, torch.fx.GraphModule)          # the part runs its own forward
    with torch.no_grad():
        out = gm(*x)
    assert out.shape == (2, 8, 32) and torch.isfinite(out).all()
    # torch.fx prints a failing graph's code and traceback to stderr: none of it shows on a compile that works
    assert capsys.readouterr().err == ""
    assert not any(isinstance(m, FactorChain) for m in model.modules())


def test_bad_inputs_still_blame_the_inputs_and_leave_the_caller_model_alone():
    model, _ = _none_arg_model()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError, match=r"does not run on example_inputs of shape \[\(2, 8\)\].*IndexError"):
        lrd_fx.compile(model, (torch.randint(60, 70, (2, 8)),), ratio=0.5, progress=False)   # ids beyond the vocabulary
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_too_many_failing_parts_raise_a_trace_error_naming_the_part(monkeypatch):
    model, x = _none_arg_model()
    monkeypatch.setattr(api, "MAX_RETRACES", 0)
    with pytest.raises(TraceError, match=r"traced part 'emb'.*NoneType.*leaf_modules"):
        lrd_fx.compile(model, x, ratio=0.5, progress=False)


@dataclasses.dataclass
class Out(collections.OrderedDict):
    """A dict subclass and a dataclass, like transformers' ModelOutput."""
    hidden: torch.Tensor = None
    extra: torch.Tensor = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is not None:
                self[f.name] = getattr(self, f.name)


class Enc(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)

    def forward(self, x):
        return Out(hidden=self.b(torch.relu(self.a(x))))


class ReadsAttribute(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = Enc()

    def forward(self, x):
        if x.sum() > -1e9:          # the root does not trace: `enc` is traced apart
            x = x + 1
        return self.enc(x).hidden   # attribute access on the part's output


def test_part_returning_a_dataclass_dict_keeps_its_class():
    torch.manual_seed(0)
    model, x = ReadsAttribute().eval(), torch.randn(2, 16)
    gm = lrd_fx.compile(model, (x,), rank="full", progress=False)
    assert isinstance(gm.enc, torch.fx.GraphModule) and not gm.lrd.kept_eager   # traced, and right
    with torch.no_grad():
        got = gm.enc(x + 1)
        assert type(got) is Out and list(got) == ["hidden"] and got.extra is None
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)


class SegHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)
        self.aux = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        result = collections.OrderedDict()
        result["out"] = self.conv(x)
        result["aux"] = self.aux(x)
        return result


def test_traced_model_returning_an_ordered_dict_keeps_it():
    torch.manual_seed(0)
    model, x = SegHead().eval(), torch.randn(1, 8, 4, 4)
    gm = lrd_fx.compile(model, (x,), rank="full", progress=False)
    assert isinstance(gm, torch.fx.GraphModule)
    with torch.no_grad():
        got, want = gm(x), model(x)
    assert type(got) is collections.OrderedDict and list(got) == ["out", "aux"]
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_hugging_face_model_output_of_a_part_traced_apart():
    mo = pytest.importorskip("transformers.modeling_outputs")

    class HFEnc(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(16, 16)

        def forward(self, x):
            return mo.BaseModelOutput(last_hidden_state=self.l(x))

    class HFModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = HFEnc()

        def forward(self, x):
            if x.sum() > -1e9:
                x = x + 1
            return self.enc(x).last_hidden_state

    torch.manual_seed(0)
    model, x = HFModel().eval(), torch.randn(2, 16)
    gm = lrd_fx.compile(model, (x,), rank="full", progress=False)
    with torch.no_grad():
        assert type(gm.enc(x)) is mo.BaseModelOutput
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)



class TryReshape(nn.Module):
    """Eager code catches the reshape's failure; the traced graph has no try, so it fails where eager runs."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        try:
            return self.lin(x.reshape(-1, 16))
        except RuntimeError:
            return self.lin(x[..., :16])


def test_root_graph_failing_where_eager_runs_is_kept_eager_or_named_with_fallback_false():
    torch.manual_seed(0)
    model, x = TryReshape().eval(), torch.randn(2, 20)           # 40 elements: reshape(-1, 16) fails
    with pytest.raises(TraceError, match=r"traced part '<root>' fails on example_inputs.*fallback=True"):
        lrd_fx.compile(model, (x,), ratio=0.5, fallback=False, progress=False)
    gm = lrd_fx.compile(model, (x,), rank="full", progress=False)
    assert set(gm.lrd.kept_eager) == {""} and type(gm) is TryReshape and isinstance(gm.lin, FactorChain)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Linear(16, 16)

    def forward(self, x):
        if x.sum() > 0:          # data-dependent: this module does not trace and is kept eager, a leaf
            return (self.query(x), x)
        return (self.query(-x), x)


class _Attention(nn.Module):
    """Like Hugging Face SwinV2's and CLAP's attention blocks: a child named `self`."""

    def __init__(self):
        super().__init__()
        setattr(self, "self", _Untraceable())
        self.output = nn.Linear(16, 16)

    def forward(self, x):
        out = getattr(self, "self")(x)
        return (self.output(out[0]),) + out[1:]


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.attention = _Attention()

    def forward(self, x):
        x = self.fc(x)
        if x.sum() > 0:          # the root does not trace: its parts are traced apart, `attention` alone
            x = x + 1
        return self.attention(x)


def test_a_leaf_child_named_self_does_not_shadow_the_graph_module():
    # traced apart, `attention`'s graph calls its leaf child `self`, and fx named that node `self`: the
    # generated forward's `self = ...` shadowed the GraphModule and the next module call failed
    import re
    torch.manual_seed(0)
    model = _Block().eval()
    x = torch.randn(4, 16).abs()
    gm = lrd_fx.compile(model, (x,), rank="full", progress=False)
    with torch.no_grad():
        for inp in (x, -x):
            torch.testing.assert_close(gm(inp)[0], model(inp)[0], rtol=1e-4, atol=1e-5)
    parts = dict(graph_modules(gm))
    assert "attention." in parts
    assert not re.search(r"^\s*self = ", parts["attention."].code, re.M)
    assert gm.lrd.plan["attention.output"]["decision"] == "decomposed"


class _Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.cls = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        return self.cls(torch.relu(self.conv(x)))

    def compute_loss(self, out, target):
        return (out - target).pow(2).mean()


class _Detector(nn.Module):
    """Like torchvision's RetinaNet and FCOS: an eager root that calls its head's compute_loss in training."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.head = _Head()

    def forward(self, x, target=None):
        out = self.head(self.stem(x))
        if self.training:
            if target is None:
                raise ValueError("training needs a target")
            return {"loss": self.head.compute_loss(out, target)}
        return out


def test_a_child_whose_other_methods_its_parent_calls_keeps_its_class():
    # traced apart, the head lost compute_loss: the first training call failed with an AttributeError
    torch.manual_seed(0)
    model = _Detector().train()
    x, t = torch.randn(2, 3, 8, 8), torch.randn(2, 8, 8, 8)
    gm = lrd_fx.compile(model, (x, t), rank="full", progress=False)
    assert type(gm.head) is _Head and "compute_loss()" in gm.lrd.fallback_parts["head"]
    torch.testing.assert_close(gm(x, t)["loss"], model(x, t)["loss"], rtol=1e-4, atol=1e-6)
    small = lrd_fx.compile(model, (x, t), ratio=0.5, min_channels=4, progress=False)
    assert small.lrd.plan["head.conv"]["decision"] == "decomposed"
    small(x, t)["loss"].backward()
    assert small.head.conv.first.weight.grad is not None
