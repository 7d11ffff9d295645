"""Public API: compile options, errors, no mutation, debug instruments, tracing fallback (save/load: test_save_load.py)."""
import contextlib
import inspect
import io
import os
import pickle
import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import lrd_fx
from lrd_fx.factorize import FactorChain

from conftest import Branchy, Wrapper, state_hash


def small_cnn():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(32, 10))


def test_caller_model_not_mutated_and_train_mode_kept():
    model = torchvision.models.resnet18(num_classes=10)
    model.train()
    before = state_hash(model)
    gm = lrd_fx.compile(model, (torch.randn(2, 3, 32, 32),), ratio=0.25)
    assert state_hash(model) == before
    assert gm.training and model.training
    assert not any(isinstance(m, FactorChain) for m in model.modules())
    assert any(isinstance(m, FactorChain) for m in gm.modules())


def test_config_object_and_overrides():
    cfg = lrd_fx.Config(ratio=0.5, min_channels=1)
    gm = lrd_fx.compile(small_cnn(), (torch.randn(1, 3, 8, 8),), config=cfg, ratio=0.25)
    assert gm.lrd.config.ratio == 0.25 and cfg.ratio == 0.5


@pytest.mark.parametrize("kwargs,err,words", [
    (dict(ratio=0.0), lrd_fx.ConfigError, "ratio"),
    (dict(ratio=1.5), lrd_fx.ConfigError, "ratio"),
    (dict(rank=0), lrd_fx.ConfigError, "rank"),
    (dict(rank={"3": 0}), lrd_fx.ConfigError, "rank"),
    (dict(rank={"nope.*": 4}), lrd_fx.RankError, "matches no"),
    (dict(rank={"7": 64}), lrd_fx.RankError, "exceeds its full rank"),
    (dict(rank=10_000), lrd_fx.RankError, "exceeds the full rank"),
    (dict(ratoi=0.3), lrd_fx.ConfigError, "unknown option"),
    (dict(conv_scheme="cp"), lrd_fx.ConfigError, "conv_scheme"),
    (dict(energy=2.0), lrd_fx.ConfigError, "energy"),
])
def test_bad_options(kwargs, err, words):
    model = small_cnn()
    before = state_hash(model)
    with pytest.raises(err, match=words):
        lrd_fx.compile(model, (torch.randn(1, 3, 8, 8),), **kwargs)
    assert state_hash(model) == before


def test_bad_example_inputs_are_named():
    model = small_cnn()
    with pytest.raises(lrd_fx.InputError, match=r"shape \[\(1, 4, 8, 8\)\]"):
        lrd_fx.compile(model, (torch.randn(1, 4, 8, 8),))
    with pytest.raises(lrd_fx.InputError, match="dtype torch.float64"):
        lrd_fx.compile(model, (torch.randn(1, 3, 8, 8, dtype=torch.float64),))
    with pytest.raises(lrd_fx.InputError, match="meta"):
        lrd_fx.compile(model, (torch.randn(1, 3, 8, 8, device="meta"),))


def test_nan_weight_is_named():
    model = small_cnn()
    with torch.no_grad():
        model[3].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(lrd_fx.FactorizationError, match="'3'"):
        lrd_fx.compile(model, (torch.randn(1, 3, 8, 8),), check_inputs=False)


def test_untraceable_parts_fall_back_and_are_reported():
    model = Wrapper()
    x = torch.randn(4, 32)
    gm = lrd_fx.compile(model, (x,), rank="full")
    assert isinstance(gm, torch.fx.GraphModule)
    assert "body" in gm.lrd.fallback_parts
    assert isinstance(gm.body.inner, torch.fx.GraphModule)
    plan = gm.lrd.plan
    assert all(plan[n]["decision"] == "decomposed" for n in ("stem", "body.inner.0", "body.inner.2", "body.head"))
    assert plan["body.head"]["fallback"] == "body"
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-4)
    assert "traced separately" in gm.lrd.report()


def test_untraceable_without_fallback_raises_trace_error():
    with pytest.raises(lrd_fx.TraceError, match=r"body.*mark it a leaf|leaf_modules") as ei:
        lrd_fx.compile(Wrapper(), (torch.randn(2, 32),), fallback=False)
    assert os.path.basename(inspect.getsourcefile(Branchy)) in str(ei.value)   # names the Python line that broke


def test_leaf_modules_option_keeps_module_whole():
    model = Wrapper()
    gm = lrd_fx.compile(model, (torch.randn(2, 32),), leaf_modules=[Branchy], fallback=False)
    assert gm.lrd.fallback_parts == {}
    head = gm.lrd.plan["body.head"]           # inside a leaf: not rewritten, but reported with the reason
    assert head["decision"] == "skipped" and "inside body (Branchy), which is kept as a leaf" in head["reason"]
    assert gm.lrd.plan["stem"]["decision"] == "decomposed"      # outside the leaf: rewritten as usual
    assert isinstance(gm.stem, FactorChain) and type(gm.body.head) is nn.Linear


def test_debug_prints_graph_after_each_pass(tmp_path):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        lrd_fx.compile(small_cnn(), (torch.randn(1, 3, 8, 8),), debug=True, dump_dir=str(tmp_path))
    out = buf.getvalue()
    stages = dict(re.findall(r"=== lrd_fx: graph after pass '(\w+)'.*?===\n(.*?)(?=\n===|\Z)", out, re.S))
    assert list(stages) == ["shape_prop", "decompose"]
    # before decompose layer 3 (a conv) is one call; after it, its Tucker-2 chain's three factor calls
    assert 'getattr(self, "3")(' in stages["shape_prop"] and ".core(" not in stages["shape_prop"]
    for role in ("first", "core", "last"):
        assert f'getattr(self, "3").{role}(' in stages["decompose"], role
    assert 'getattr(self, "3")(' not in stages["decompose"]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["01_shape_prop.py", "02_decompose.py"]
    assert 'getattr(self, "3").core(' in (tmp_path / "02_decompose.py").read_text()


def test_env_debug(monkeypatch, capsys):
    monkeypatch.setenv("LRD_FX_DEBUG", "1")
    lrd_fx.compile(small_cnn(), (torch.randn(1, 3, 8, 8),))
    assert "graph after pass 'decompose'" in capsys.readouterr().out


def test_failing_pass_is_named():
    from lrd_fx.pipeline import PassManager, PassResult

    def ok(gm):
        return PassResult(gm, False)
    ok.name = "ok"

    def broken(gm):
        raise RuntimeError("boom")
    broken.name = "broken"
    gm = torch.fx.symbolic_trace(small_cnn())
    with pytest.raises(lrd_fx.PassError, match=r"pass 'broken' failed \(passes run before it: \['ok'\]\).*boom"):
        PassManager([ok, broken]).run(gm)


def test_report_and_plan_are_complete():
    import json
    gm = lrd_fx.compile(small_cnn(), (torch.randn(1, 3, 8, 8),), ratio=0.25)
    plan = gm.lrd.plan
    assert set(plan) == {"0", "3", "7"}
    json.dumps(plan)
    text = gm.lrd.report()
    for word in ("layer", "ranks", "params", "MFLOPs", "decision", "GFLOPs per forward"):
        assert word in text
    assert gm.lrd.flops_after < gm.lrd.flops_before


class _Experts(nn.Module):
    """Mixture-of-experts weights held as one 3-D tensor (no Linear layer): left as they are."""

    def __init__(self, n=4, d=16, f=32):
        super().__init__()
        self.up = nn.Parameter(torch.randn(n, f, d) * 0.1)

    def forward(self, x):
        return torch.einsum("bd,efd->bf", x, self.up)


class _EmbedExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 16)
        self.experts = _Experts()
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 16)
        self.extra = self.embed.weight                    # a second name for the embedding: counted once

    def forward(self, ids):
        return self.head(self.norm(self.experts(self.embed(ids).mean(1))))


def test_report_says_where_the_parameters_outside_layers_are():
    """Parameters no Conv/Linear layer holds (embeddings, 3-D expert tensors, norms) are totalled once
    each and, when they are a large share of the model, listed by module type with the largest tensor."""
    from lrd_fx.report import outside_layers
    model = _EmbedExperts().eval()
    gm = lrd_fx.compile(model, (torch.randint(0, 100, (2, 5)),), ratio=0.5, min_channels=1, progress=False)
    n, rows = gm.lrd.outside
    assert (n, rows) == outside_layers(model, gm.lrd.records())
    assert n == 1600 + 2048 + 64                      # embedding (tied name once) + experts + LayerNorm
    assert [r[:2] for r in rows] == [("_Experts", 2048), ("Embedding", 1600), ("LayerNorm", 64)]
    assert rows[0][2:] == ("experts.up", [4, 32, 16])
    text = gm.lrd.report()
    assert re.search(r"params outside Conv/Linear layers\s+3,712\s+88% of the original model", text)
    assert "_Experts: 2,048 (48%), largest experts.up 4x32x16; 3-D weights are not factorized" in text
    assert "Embedding: 1,600 (38%), largest embed.weight 100x16" in text
    # a CNN: its BatchNorm parameters are a small share, totalled without the by-type list
    cnn = lrd_fx.compile(small_cnn(), (torch.randn(1, 3, 8, 8),), ratio=0.25, progress=False)
    text = cnn.lrd.report()
    share = f"{32 / cnn.lrd.params_before:.0%}"       # the BatchNorm's weight and bias
    assert re.search(rf"params outside Conv/Linear layers\s+32\s+{share} of the original model", text)
    assert "by module type" not in text


def test_inference_mode_at_compile_load_or_fuse_gives_a_trainable_model(tmp_path):
    """Tensors made under torch.inference_mode never join autograd: compile, load and fuse run outside it,
    so their models train (or run with grad on) afterwards; a model built under inference mode compiles
    too (its weights are copied into ordinary tensors, the caller's left as they are)."""
    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(0)
    model = small_cnn().eval()
    ref = lrd_fx.compile(model, (x,), ratio=0.5, progress=False)
    with torch.inference_mode():
        gm = lrd_fx.compile(model, (x,), ratio=0.5, progress=False)
    assert not any(p.is_inference() for p in gm.parameters())
    torch.testing.assert_close(gm(x), ref(x), rtol=0, atol=0)
    gm.train()(x).sum().backward()
    assert all(p.grad is not None for p in gm.parameters() if p.requires_grad)
    path = str(tmp_path / "m.safetensors")
    lrd_fx.save(ref, path)
    gated = lrd_fx.compile(model, (x,), ratio=0.5, freeze="sequential", progress=False)
    with torch.inference_mode():
        loaded = lrd_fx.load(model, path)
        fused = lrd_fx.fuse(ref)
        stripped = lrd_fx.strip_gates(gated)
    assert not any(p.is_inference() for m in (loaded, fused, stripped) for p in m.parameters())
    loaded.train()(x).sum().backward()
    torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-5)
    with torch.inference_mode():
        built = small_cnn().eval()
    assert all(p.is_inference() for p in built.parameters())
    gm = lrd_fx.compile(built, (x,), ratio=0.5, progress=False)
    assert not any(p.is_inference() for p in gm.parameters())
    gm.train()(x).sum().backward()
    assert all(p.is_inference() for p in built.parameters())


@pytest.mark.parametrize("how", ["lazy", "calibration", "allocate"])
def test_compiled_model_keeps_every_modules_own_mode(how):
    """A training model with a BatchNorm frozen by .eval() (fine-tuning practice) comes back with that
    BatchNorm still in eval mode, also through the passes that run the model in eval mode on the way
    (the eager forward that sizes lazy layers, calibration, rank allocation): model.train(was) would
    have set every module to the root's flag, and the frozen statistics would move in training."""
    lazy = how == "lazy"
    model = nn.Sequential(nn.LazyConv2d(16, 3) if lazy else nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3), nn.Flatten(), nn.LazyLinear(10) if lazy else nn.Linear(576, 10))
    model.train()
    model[1].eval()
    x = torch.randn(4, 3, 10, 10)
    kw = {} if lazy else {"calibration": [x, x]}
    if how == "allocate":
        kw["calibration_allocate"] = "sensitivity"
    gm = lrd_fx.compile(model, (x,), ratio=0.5, min_channels=1, progress=False, **kw)
    assert gm.training and not gm.get_submodule("1").training
    assert not model[1].training and model.training
    chains = [m for m in gm.modules() if isinstance(m, FactorChain)]
    assert chains and all(c.training and all(f.training for f in c.children()) for c in chains)
    before = gm.get_submodule("1").running_mean.clone()
    gm(x)
    torch.testing.assert_close(gm.get_submodule("1").running_mean, before, rtol=0, atol=0)


class _ModeNet(nn.Module):
    """Its forward reads self.training (functional dropout): traced in both modes and merged."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = F.dropout(x.mean((2, 3)), 0.5, self.training)
        return self.fc(x)


@pytest.mark.parametrize("train", [False, True])
def test_compiled_model_keeps_the_callers_mode(train):
    """An eval model comes back in eval mode (every module): BatchNorm on batch 1 and dropout then behave
    as in the original."""
    model = _ModeNet().train(train)
    x = torch.randn(1, 8, 8, 8)
    gm = lrd_fx.compile(model, (x,), ratio=0.5, min_channels=1, progress=False)
    assert [m.training for m in gm.modules()] == [train] * len(list(gm.modules()))
    if not train:
        torch.testing.assert_close(gm(x), gm(x))      # no dropout, no batch statistics


class _KwModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x, mask=None, *, scale=1.0):
        y = self.fc(x) * scale
        return y if mask is None else y * mask


def test_example_inputs_dict_maps_to_positional_order_and_bad_keys_are_named(tmp_path):
    model = _KwModel().eval()
    x, mask = torch.randn(4, 16), torch.ones(4, 16)
    gm = lrd_fx.compile(model, {"x": x, "mask": mask}, rank="full", progress=False)
    torch.testing.assert_close(gm(x, mask), model(x, mask), rtol=1e-4, atol=1e-5)
    assert gm.lrd.plan["fc"]["decision"] == "decomposed"
    lrd_fx.save(gm, tmp_path / "m.safetensors")
    loaded = lrd_fx.load(model, tmp_path / "m.safetensors", example_inputs={"x": x, "mask": mask})
    torch.testing.assert_close(loaded(x, mask), gm(x, mask))
    with pytest.raises(lrd_fx.InputError, match="'scale'.*not positional parameters of _KwModel.forward"):
        lrd_fx.compile(model, {"x": x, "scale": 2.0}, progress=False)
    with pytest.raises(lrd_fx.InputError, match="no 'x', which _KwModel.forward requires before 'mask'"):
        lrd_fx.compile(model, {"mask": mask}, progress=False)
    with pytest.raises(lrd_fx.InputError, match="empty dict"):
        lrd_fx.compile(model, {}, progress=False)
    with pytest.raises(lrd_fx.InputError, match="a dict of keyword inputs"):
        lrd_fx.compile(model, "x", progress=False)


class _OptionalMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x, mask=None):
        y = self.fc(x)
        if mask is not None:        # fx traces a placeholder as given: this branch, unless mask is fixed None
            y = y * mask.view(-1, 16)
        return y


class _OptionalMaskKwargs(_OptionalMask):
    def forward(self, x, mask=None, **kwargs):   # Hugging Face forwards take **kwargs like this
        return super().forward(x, mask)


def test_inputs_left_none_are_traced_as_none():
    """forward(x, mask=None) compiled with (x,) or (x, None): the graph is the mask-less branch (it used
    to trace `mask.view` and fail in shape_prop with a PassError, as timm's Hiera did); with a mask given,
    the mask branch. Passing a mask to the mask-less graph, by position or by keyword, is an InputError
    naming it: fx had renamed the input `mask_1`, so a keyword call was a TypeError, or, where forward
    takes **kwargs, silently ignored (the output without the mask)."""
    x, mask = torch.randn(4, 16), torch.rand(4, 16)
    for model in (_OptionalMask().eval(), _OptionalMaskKwargs().eval()):
        for inputs in ((x,), (x, None)):
            gm = lrd_fx.compile(model, inputs, rank="full", progress=False)
            torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(gm(x, mask=None), model(x), rtol=1e-4, atol=1e-5)
            for call in (lambda: gm(x, mask), lambda: gm(x, mask=mask)):
                with pytest.raises(lrd_fx.InputError, match="input 'mask' was traced as None"):
                    call()
            gm.graph.eliminate_dead_code()         # a user's own graph pass keeps the check
            gm.recompile()
            with pytest.raises(lrd_fx.InputError):
                gm(x, mask=mask)
    gm = lrd_fx.compile(model, (x, mask), rank="full", progress=False)
    torch.testing.assert_close(gm(x, mask), model(x, mask), rtol=1e-4, atol=1e-5)


class _MaskOrScale(nn.Module):
    """forward(x, mask=None): the mask branch fails without a mask (mask.view), the scale branch computes
    something else with None than the eager None branch (scale or 1.0)."""

    def __init__(self, fails: bool):
        super().__init__()
        self.fc, self.fails = nn.Linear(16, 16), fails

    def forward(self, x, mask=None):
        y = self.fc(x)
        if self.fails:
            return y * mask.view(-1, 16) if mask is not None else y
        return y * 2 if mask is not None else y


@pytest.mark.parametrize("fails", [True, False])
def test_root_traced_with_an_optional_input_given_also_takes_it_left_out(fails):
    """Compiled with the mask given, the whole-model graph takes the mask branch only: called without it,
    it failed inside its own code (or would compute the mask branch). Compile calls it once without the
    mask; where the eager model runs and the graph fails or differs, the root stays eager with the reason,
    and the compiled model takes both calls."""
    model = _MaskOrScale(fails).eval()
    x, mask = torch.randn(4, 16), torch.rand(4, 16)
    gm = lrd_fx.compile(model, (x, mask), rank="full", progress=False)
    assert not isinstance(gm, torch.fx.GraphModule) and "optional input given in example_inputs ('mask')" in \
        gm.lrd.fallback_parts["<root>"]
    assert isinstance(gm.fc, FactorChain)
    for args in ((x,), (x, None), (x, mask)):
        torch.testing.assert_close(gm(*args), model(*args), rtol=1e-4, atol=1e-5)


class _DictBatch(nn.Module):
    """forward(batch): a dict whose "mask" key is optional."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, batch):
        y = self.fc(batch["x"])
        return y * batch["mask"] if batch.get("mask") is not None else y


def test_root_traced_with_an_optional_dict_key_also_takes_the_dict_without_it():
    """Compiled with {"x", "mask"}, the graph read batch["mask"]: called without the key, it failed with a
    KeyError in its own code. Each key is tried left out at compile; the root stays eager here."""
    model = _DictBatch().eval()
    x, mask = torch.randn(4, 16), torch.rand(4, 16)
    gm = lrd_fx.compile(model, ({"x": x, "mask": mask},), rank="full", progress=False)
    assert "key 'mask' of input 0" in gm.lrd.fallback_parts["<root>"]
    for batch in ({"x": x, "mask": mask}, {"x": x}):
        torch.testing.assert_close(gm(batch), model(batch), rtol=1e-4, atol=1e-5)


class _MaskIgnored(nn.Module):
    """forward(x, mask=None): both branches compute the same (the None branch adds a dropout of p=0)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x, mask=None):
        return F.dropout(self.fc(x), p=0.0, training=False) if mask is None else self.fc(x)


def test_root_graph_that_gives_the_same_without_the_given_input_stays_a_graph():
    """The check keeps the root eager only where the graph fails or differs without the input."""
    model, x = _MaskIgnored().eval(), torch.randn(4, 16)
    gm = lrd_fx.compile(model, (x, torch.ones(4, 16)), rank="full", progress=False)
    assert isinstance(gm, torch.fx.GraphModule) and "<root>" not in gm.lrd.fallback_parts
    torch.testing.assert_close(gm(x, None), model(x), rtol=1e-4, atol=1e-5)


def test_input_traced_as_none_survives_save_load_and_torchscript(tmp_path):
    """The file records which inputs were traced as None: load() without example inputs rebuilds that
    graph (it traced the mask branch, which fails without a mask), and torch.jit.script takes the graph
    (the input is annotated Optional) and still stops a mask."""
    model = _OptionalMask().eval()
    x, mask = torch.randn(4, 16), torch.rand(4, 16)
    gm = lrd_fx.compile(model, (x,), ratio=0.5, progress=False)
    assert gm.lrd.traced_none == ["mask"]
    path = tmp_path / "m.lrd"
    lrd_fx.save(gm, path)
    for loaded in (lrd_fx.load(model, path), lrd_fx.load(model, path, (x,))):
        assert loaded.lrd.traced_none == ["mask"]
        torch.testing.assert_close(loaded(x), gm(x), rtol=0, atol=0)
        with pytest.raises(lrd_fx.InputError, match="'mask'"):
            loaded(x, mask=mask)
    # compiled with a mask, loaded without inputs: the same; loaded with (x,): the mask-less graph, with the
    # same weights
    masked = lrd_fx.compile(model, (x, mask), ratio=0.5, progress=False)
    assert masked.lrd.traced_none == []
    lrd_fx.save(masked, path)
    torch.testing.assert_close(lrd_fx.load(model, path)(x, mask), masked(x, mask), rtol=0, atol=0)
    plain = lrd_fx.load(model, path, (x,))
    assert plain.lrd.traced_none == ["mask"]
    torch.testing.assert_close(plain(x), masked(x, torch.ones_like(mask)), rtol=1e-6, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(lrd_fx.strip_gates(gm))
    torch.testing.assert_close(scripted(x), gm(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(Exception, match="traced as None"):
        scripted(x, mask)
    # pickled whole: fx rebuilds the graph by tracing its code, which ran the check on a Proxy and raised
    back = pickle.loads(pickle.dumps(gm))
    torch.testing.assert_close(back(x), gm(x), rtol=0, atol=0)
    with pytest.raises(lrd_fx.InputError, match="'mask'"):
        back(x, mask=mask)


def _flagged(default):
    """forward(x, flag=<default>): the root's Python code branches on a plain default (timm's ViT, DeiT and
    EVA take `is_causal=False` and branch on it), so fx cannot trace it as an input."""
    class Flagged(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x, flag=default):
            y = self.fc(x)
            return y * 2 if flag == default else y
    return Flagged().eval()


@pytest.mark.parametrize("default", [False, 3, 0.5, "mean"])
def test_left_out_default_the_root_branches_on_is_traced_at_it(default, tmp_path):
    """Compiled with (x,), a root whose code branches on a left-out bool/int/float/str default was kept
    eager (fx traced the input and failed on the branch). It is traced at the default now: one graph,
    the same outputs, and another value is an InputError naming the input, also after save/load without
    example inputs and in TorchScript. Given in example_inputs, the input stays open (the root eager)."""
    model, x = _flagged(default), torch.randn(4, 16)
    other = {False: True, 3: 4, 0.5: 1.5, "mean": "sum"}[default]
    gm = lrd_fx.compile(model, (x,), rank="full", progress=False)
    assert isinstance(gm, torch.fx.GraphModule) and "<root>" not in gm.lrd.fallback_parts
    assert gm.lrd.traced_defaults == {"flag": default}
    assert any(f"flag={default!r}" in n for n in gm.lrd.notes)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gm(x, flag=default), model(x), rtol=1e-4, atol=1e-5)
    for call in (lambda: gm(x, other), lambda: gm(x, flag=other)):
        with pytest.raises(lrd_fx.InputError, match=f"input 'flag' was traced at its default {default!r}"
                           if isinstance(default, str) else f"input 'flag' was traced at its default {default}"):
            call()
    gm.graph.eliminate_dead_code()          # a user's own graph pass keeps the check
    gm.recompile()
    with pytest.raises(lrd_fx.InputError):
        gm(x, flag=other)
    back = pickle.loads(pickle.dumps(gm))   # fx rebuilds it by tracing its code: the check stays a node
    torch.testing.assert_close(back(x), gm(x), rtol=0, atol=0)
    with pytest.raises(lrd_fx.InputError):
        back(x, flag=other)
    path = tmp_path / "m.lrd"
    lrd_fx.save(gm, path)
    loaded = lrd_fx.load(model, path)
    assert isinstance(loaded, torch.fx.GraphModule) and loaded.lrd.traced_defaults == {"flag": default}
    torch.testing.assert_close(loaded(x), gm(x), rtol=0, atol=0)
    with pytest.raises(lrd_fx.InputError, match="'flag'"):
        loaded(x, flag=other)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(lrd_fx.strip_gates(gm))
    torch.testing.assert_close(scripted(x), gm(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(Exception, match="traced at its default"):
        scripted(x, other)
    given = lrd_fx.compile(model, (x, other), rank="full", progress=False)
    assert "<root>" in given.lrd.fallback_parts and given.lrd.traced_defaults == {}
    for flag in (default, other):
        torch.testing.assert_close(given(x, flag), model(x, flag), rtol=1e-4, atol=1e-5)


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x, scale: float = 2.0, mode: str = "plain"):
        return self.fc(x) * scale          # traces as an input: no branch on it


class _DataBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x, flag: bool = False):
        y = self.fc(x)
        if y.sum() > 0:                    # data-dependent: no default makes this trace
            y = y * 2
        return -y if flag else y


def test_defaults_stay_inputs_where_fixing_them_is_not_needed_or_does_not_help():
    """A default that traces as an input stays one (any value works); where fixing the defaults does not
    get the root's trace further, they are left open too, and the eager root takes any value."""
    x = torch.randn(4, 16)
    model = _Scaled().eval()
    gm = lrd_fx.compile(model, (x,), rank="full", progress=False)
    assert isinstance(gm, torch.fx.GraphModule) and gm.lrd.traced_defaults == {}
    torch.testing.assert_close(gm(x, scale=3.0), model(x, scale=3.0), rtol=1e-4, atol=1e-5)
    model = _DataBranch().eval()
    gm = lrd_fx.compile(model, (x,), rank="full", progress=False)
    assert "<root>" in gm.lrd.fallback_parts and gm.lrd.traced_defaults == {}
    torch.testing.assert_close(gm(x, flag=True), model(x, flag=True), rtol=1e-4, atol=1e-5)


def test_compile_warns_when_it_factorizes_nothing():
    import warnings
    small = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"factorized none of the model's 2 Conv/Linear layers.*min_channels") as got:
        gm = lrd_fx.compile(small, (torch.randn(2, 4),), progress=False)
    assert got[0].filename == __file__              # the caller's line, not one of lrd_fx's
    assert all(r["decision"] == "skipped" for r in gm.lrd.plan.values())
    big = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # one layer factorized: no warning
        gm = lrd_fx.compile(big, (torch.randn(2, 32),), ratio=0.5, progress=False)
    assert gm.lrd.plan["0"]["decision"] == "decomposed"


def test_compile_warns_when_most_parameters_are_outside_layers():
    """Most of the parameters in a 3-D expert tensor and an embedding: the model shrinks far less than
    the ratio says, and the warning says where the parameters are; a CNN does not warn."""
    import warnings
    with pytest.warns(UserWarning, match=r"88% of the model's parameters are outside Conv/Linear layers and are left "
                                         r"as they are \(_Experts 48%, 3-D weights; Embedding 38%\), so the model "
                                         r"keeps 0\.94x its parameters") as got:
        gm = lrd_fx.compile(_EmbedExperts().eval(), (torch.randint(0, 100, (2, 5)),), ratio=0.5, min_channels=1,
                            progress=False)
    assert got[0].filename == __file__
    assert gm.lrd.params_after / gm.lrd.params_before == pytest.approx(0.94, abs=0.005)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lrd_fx.compile(small_cnn(), (torch.randn(1, 3, 8, 8),), ratio=0.25, progress=False)
