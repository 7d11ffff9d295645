"""Registry: one helper behind every register_* name; selecting by name, errors that list the names."""
import pytest
import torch
import torch.nn as nn

import lrd_fx
from lrd_fx import freezing, trace
from lrd_fx.cost import model as cm
from lrd_fx.errors import ConfigError, FreezeError
from lrd_fx.registry import Registry


def test_register_as_decorator_call_and_bare():
    reg = Registry("widget", hint="add one with @register_widget")

    @reg.register("a")
    def fa():
        return "a"

    @reg.register
    def fb():
        return "b"

    @reg.register()
    def fc():
        return "c"

    assert reg.register("d", len) is len            # as a call, returns the object
    assert reg.names() == ["a", "d", "fb", "fc"] and list(reg) == reg.names() and len(reg) == 4
    assert reg.get("a") is fa and reg.get("fb") is fb and reg["fc"] is fc
    assert "a" in reg and "zz" not in reg
    assert reg.names("f*") == ["fb", "fc"]
    reg.register("a", fb)                            # re-registering a name replaces it
    assert reg.get("a") is fb
    del reg["a"]
    assert "a" not in reg


def test_get_passes_callables_and_names_the_known_entries():
    reg = Registry("widget", hint="add one with @register_widget")
    reg.register("one", lambda: 1)
    own = lambda: 2  # noqa: E731
    assert reg.get(own) is own                       # a user's own strategy, not a name
    with pytest.raises(ConfigError, match=r"'two' is not a known widget.*\['one'\].*@register_widget"):
        reg.get("two")
    with pytest.raises(ConfigError, match="pass a registered name"):
        reg.get(3)
    assert reg.get("two", None) is None               # a default instead of the error
    with pytest.raises(ConfigError, match="non-empty string"):
        reg.register("", len)
    other = Registry("schedule", error=FreezeError)
    with pytest.raises(FreezeError):
        other.get("x")


def test_schedules_use_the_registry():
    assert isinstance(freezing.SCHEDULES, Registry)

    @lrd_fx.register_schedule("every_third")
    def every_third(config):
        return freezing.SequentialSchedule(3)
    try:
        assert "every_third" in lrd_fx.schedule_names()
        assert freezing.make_schedule("every_third").period == 3
        assert lrd_fx.Config(freeze="every_third").freeze is not None   # a registered name is valid
    finally:
        del freezing.SCHEDULES["every_third"]
    with pytest.raises(FreezeError, match="not a known schedule.*sequential.*static"):
        freezing.make_schedule("every_third")
    with pytest.raises(ConfigError, match="sequential"):
        lrd_fx.Config(freeze="every_third")


def test_cost_models_use_the_registry():
    assert isinstance(cm.COST_MODELS, Registry) and "staircase" in cm.COST_MODELS
    with pytest.raises(ConfigError, match=r"not registered.*staircase"):
        cm.get_cost_model("nope")

    def lowest(curve, *, estimate, full, original=None, **_):
        return cm.Choice(min(curve), False, "lowest")
    assert lrd_fx.cost.register_cost_model("lowest_x", lowest) is lowest      # as a call
    try:
        assert cm.choose({5: 1.0, 9: 0.5}, model="lowest_x", estimate=9, full=16).rank == 5
    finally:
        del cm.COST_MODELS["lowest_x"]


class _Opaque(nn.Module):
    def forward(self, x):
        if x.sum() > 0:          # data-dependent control flow: fx cannot trace into it
            return x * 2
        return x


def opaque_fn(x):
    return x + 1 if bool(x.sum() > 0) else x


def test_leaf_modules_and_functions_use_the_registry():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _Opaque()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return opaque_fn(self.inner(self.fc(x)))

    assert lrd_fx.register_leaf_module(_Opaque) is _Opaque
    assert lrd_fx.register_leaf_function(opaque_fn) is opaque_fn
    try:
        assert _Opaque in set(trace.LEAF_MODULES.values())
        names = trace.LEAF_MODULES.names()
        assert f"{__name__}._Opaque" in names
        gm = trace.LRDTracer().trace(Net())
        ops = {(n.op, str(n.target)) for n in gm.nodes}
        assert ("call_module", "inner") in ops
        assert any(op == "call_function" and "opaque_fn" in t for op, t in ops)
    finally:
        del trace.LEAF_MODULES[f"{__name__}._Opaque"]
        del trace.LEAF_FUNCTIONS[f"{__name__}.opaque_fn"]
    with pytest.raises(Exception):   # no longer a leaf: tracing hits the data-dependent branch
        trace.LRDTracer().trace(Net())


def test_local_classes_do_not_replace_each_other():
    def make():
        class Block(nn.Module):
            pass
        return Block
    a, b = make(), make()
    lrd_fx.register_leaf_module(a)
    lrd_fx.register_leaf_module(b)
    try:
        assert {a, b} <= set(trace.LEAF_MODULES.values())
    finally:
        for k in [k for k, v in trace.LEAF_MODULES.items() if v in (a, b)]:
            del trace.LEAF_MODULES[k]


def test_a_registered_cost_model_is_selected_by_name_from_compile():
    seen = []

    @lrd_fx.cost.register_cost_model("always_lowest")
    def lowest(curve, *, estimate, full, original=None, **_):
        seen.append((estimate, full))
        return cm.Choice(min(curve), False, "always the lowest candidate")

    model = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
    x = torch.randn(2, 32, 5, 5)
    fake = lambda module, shape, mode: 1.0 if isinstance(module, nn.Conv2d) else 0.5   # noqa: E731
    try:
        with lrd_fx.cost.use_cost_fn(fake):
            default = lrd_fx.compile(model, (x,), rank=20, rank_search="infer", progress=False)
            assert not seen                                       # the default model is "staircase"
            gm = lrd_fx.compile(model, (x,), rank=20, rank_search="infer", rank_search_cost_model="always_lowest",
                                progress=False)
            gm2 = lrd_fx.compile(model, (x,), config=lrd_fx.Config(
                rank=20, rank_search=lrd_fx.RankSearch(cost_model="always_lowest")), progress=False)
        assert seen and seen[0][0] == 20
        rec = gm.lrd.plan["0"]
        assert rec["reason"].startswith("always the lowest") and rec["ranks"][0] == 15   # the +-25% window's low end
        assert gm2.lrd.plan["0"]["ranks"] == rec["ranks"] != default.lrd.plan["0"]["ranks"]
        assert gm.lrd.config.rank_search.cost_model == "always_lowest"
    finally:
        del cm.COST_MODELS["always_lowest"]
    with pytest.raises(ConfigError, match=r"'always_lowest' is not a known cost model.*known: \[.*'staircase'"):
        lrd_fx.compile(model, (x,), rank=20, rank_search="infer", rank_search_cost_model="always_lowest")
