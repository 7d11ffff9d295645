"""Config validation: every option's type and range, one rank rule per layer, empty example batches."""
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import lrd_fx
from lrd_fx import Config, ConfigError, InputError
from lrd_fx.cost import use_cost_fn

from conftest import state_hash

NAN = float("nan")


def small_model():
    return nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 16))


X = torch.randn(2, 16, 4, 4)


BAD = [
    dict(ratio="0.5"), dict(ratio=True), dict(ratio=NAN), dict(ratio=0.0), dict(ratio=1.5),
    dict(energy="0.9"), dict(energy=True), dict(energy=NAN), dict(energy=0.0), dict(energy=1.01),
    dict(rank=0), dict(rank=True), dict(rank=2.5), dict(rank="half"), dict(rank={"a": 0}), dict(rank={1: 4}),
    dict(rank={"a": (1, 2, 3)}), dict(rank={"a": "8"}), dict(rank={"a": (4, True)}),
    dict(conv_scheme="cp"), dict(conv_scheme=None),
    dict(min_channels=0), dict(min_channels=2.0), dict(min_channels=True),
    dict(skip=5), dict(skip=("a", 5)), dict(skip=None),
    dict(filter_fn="abc"), dict(filter_fn=5),
    dict(decompose_linear=1), dict(decompose_conv="no"), dict(decompose_grouped="yes"), dict(fallback=0), dict(progress=1),
    dict(debug=1), dict(check_inputs=None),
    dict(leaf_modules=5), dict(leaf_modules=(int,)), dict(leaf_modules=("a", 3)),
    dict(rank_search="fast"), dict(rank_search=True),
    *[dict(kw, rank_search="infer") for kw in [   # options of the search: given with the search on
        dict(rank_search_window=NAN), dict(rank_search_window=-0.1), dict(rank_search_window=1.5),
        dict(rank_search_window="0.2"),
        dict(rank_search_margin=-5), dict(rank_search_margin=NAN), dict(rank_search_margin=1.0),
        dict(rank_search_prefer="size"), dict(rank_search_objective="error"),
        dict(rank_search_error_weight=-1.0), dict(rank_search_error_weight=NAN),
        dict(rank_search_error_weight=math.inf),
        dict(rank_search_budget_s=0), dict(rank_search_budget_s=-1.0), dict(rank_search_budget_s=NAN),
        dict(rank_search_budget_s="60"),
        dict(rank_budget=0.0), dict(rank_budget=2.0), dict(rank_budget=NAN),
        dict(rank_search_cost_model="no_such_model"), dict(rank_search_cost_model=5)]],
    dict(amp="fp8"), dict(rank_search_exec="jit"),
    dict(calibration_mode="greedy"), dict(calibration_damping=0), dict(recalibrate_bn="yes"),
    dict(whole_model_check=1), dict(align=0), dict(align=True),
    dict(rank_search_repeats=0), dict(rank_search_repeats=3.0), dict(rank_search_repeats=True),
    dict(cache=123), dict(cache=""), dict(cache=1.0),
    dict(freeze="sometimes"), dict(freeze=3),
    dict(freeze_period=0, freeze="sequential"), dict(freeze_period=1.5, freeze="sequential"),
    dict(freeze_period=True, freeze="sequential"), dict(freeze_group="middle", freeze="static"),
    dict(dump_dir=5), dict(dump_dir=""), dict(dump_dir=True),
]


@pytest.mark.parametrize("kwargs", BAD, ids=lambda kw: "-".join(f"{k}={v!r}" for k, v in kw.items()))
def test_bad_option_is_a_config_error_naming_it(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ConfigError, match=f"{name}"):
        Config(**kwargs)                       # direct construction validates
    with pytest.raises(ConfigError, match=f"{name}"):
        Config().replace(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(energy="0.9"), dict(leaf_modules=5), dict(dump_dir=5), dict(skip=5),
                                    dict(filter_fn="abc"), dict(cache=123),
                                    dict(rank_search_margin=-5, rank_search="infer"),
                                    dict(rank_search_repeats=0), dict(debug=1)])
def test_compile_rejects_bad_options_before_touching_the_model(kwargs):
    model = small_model()
    before = state_hash(model)
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        lrd_fx.compile(model, (X,), **kwargs)
    assert state_hash(model) == before


def test_messages_say_what_to_pass():
    for kwargs, fix in [(dict(rank_search_margin=-5, rank_search="infer"), "rank_search_margin=0.03"),
                        (dict(energy="0.9"), "energy=0.9"), (dict(skip=5), "skip=('fc'"),
                        (dict(cache=123), "False (no cache)"), (dict(debug=1), "True or False"),
                        (dict(rank_search_repeats=0), "rank_search_repeats=7")]:
        with pytest.raises(ConfigError) as e:
            Config(**kwargs)
        assert fix in str(e.value), (kwargs, str(e.value))


class _Foreign:
    """A value of no type any option accepts (not a number, string, bool, path, tuple or callable)."""


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(Config)])
def test_every_option_is_type_checked(field):
    with pytest.raises(ConfigError, match=field):
        Config(**{field: _Foreign()})


@pytest.mark.parametrize("kwargs", [
    dict(ratio=np.float64(0.5)), dict(ratio=1), dict(energy=1), dict(rank=np.int64(4)),
    dict(cache=False), dict(cache=None), dict(cache="t.sqlite"), dict(cache=Path("t.sqlite")),
    dict(dump_dir=Path("stages")), dict(leaf_modules=[nn.ReLU, "body.inner"]), dict(skip=["a", "b.*"]),
    dict(rank_search="train", rank_search_window=0, rank_search_margin=0, rank_search_error_weight=0,
         rank_search_budget_s=0.5, rank_budget=1, rank_search_cost_model="staircase"),
    dict(rank_search_repeats=1, amp="bf16", rank_search_exec="eager"), dict(filter_fn=lambda n, m: True),
    dict(rank_search=lrd_fx.RankSearch(cost_model=lambda curve, **kw: None)),
    dict(calibration_mode="oneshot", calibration_damping=1e-6, recalibrate_bn=False),
    dict(freeze="sequential", freeze_period=3), dict(freeze=lambda epoch, layer, role: True),
    dict(rank={"a": 4, "b.*": (2, 3), "c": [2, 3]}),
])
def test_valid_options_are_accepted(kwargs):
    Config(**kwargs)


def test_shorthand_forms_are_normalised_at_construction():
    assert Config(skip="fc").skip == ("fc",)
    assert Config(skip=["a", "b"]).skip == ("a", "b")
    assert sorted(Config(skip={"a", "b"}).skip) == ["a", "b"]
    assert Config(leaf_modules=nn.ReLU).leaf_modules == (nn.ReLU,)
    assert Config(leaf_modules=["x"]).leaf_modules == ("x",)
    ranks = {"a": [2, 3]}                       # what a JSON file gives back
    cfg = Config(rank=ranks)
    assert cfg.rank == {"a": (2, 3)} and ranks == {"a": [2, 3]}   # the caller's dict is not touched
    assert Config().replace(skip="fc").skip == ("fc",)


def test_validate_never_mutates():
    cfg = Config(skip=("a",), rank={"a": 4})
    before = dataclasses.astuple(cfg)
    cfg.validate()
    assert dataclasses.astuple(cfg) == before
    cfg.skip = "x"                              # set after construction: validate reports, does not fix
    with pytest.raises(ConfigError, match="skip"):
        cfg.validate()
    assert cfg.skip == "x"


# --- ratio / rank / energy: one rule per layer -------------------------------------------------------

def test_ratio_defaults_to_a_quarter_and_reads_as_a_float():
    cfg = Config()
    assert cfg.ratio == 0.25 and isinstance(cfg.ratio, float) and not cfg.ratio_given
    assert Config(ratio=None).ratio == 0.25 and Config(ratio=0.25).ratio_given
    assert Config(rank=8).replace(conv_scheme="svd").ratio_given is False


@pytest.mark.parametrize("kwargs", [
    dict(rank=8, energy=0.9), dict(rank="full", energy=0.9), dict(rank="vbmf", energy=0.5),
    dict(ratio=0.5, rank=8), dict(ratio=0.25, rank="full"), dict(ratio=0.5, rank="vbmf"),
    dict(ratio=0.5, energy=0.9), dict(ratio=0.5, energy=0.9, rank={"fc": 4}),
])
def test_rank_rules_that_exclude_each_other(kwargs):
    with pytest.raises(ConfigError, match="exclude each other"):
        Config(**kwargs)


def test_explicit_ratio_in_a_config_conflicts_with_a_later_rank():
    cfg = Config(ratio=0.5)
    with pytest.raises(ConfigError, match="ratio=0.5"):
        cfg.replace(rank=8)
    assert cfg.replace(rank=8, ratio=None).rank == 8     # ratio=None drops it
    assert Config(energy=0.9).replace(energy=None, rank=4).rank == 4


def test_a_rank_dict_combines_with_ratio_or_energy_for_the_other_layers():
    model = small_model()
    gm = lrd_fx.compile(model, (X,), rank={"3": 2}, ratio=0.5, min_channels=1, progress=False)
    plan = gm.lrd.plan
    assert plan["3"]["ranks"] == [2] and plan["3"]["reason"].startswith("rank[")
    assert plan["0"]["reason"] == "ratio=0.5"
    gm = lrd_fx.compile(model, (X,), rank={"3": 2}, energy=0.9, min_channels=1, progress=False)
    assert gm.lrd.plan["0"]["reason"] == "energy=0.9" and gm.lrd.plan["3"]["ranks"] == [2]


def test_compile_rejects_two_rules_without_touching_the_model():
    model = small_model()
    before = state_hash(model)
    with pytest.raises(ConfigError, match="exclude each other"):
        lrd_fx.compile(model, (X,), config=Config(energy=0.9), rank=4)
    with pytest.raises(ConfigError, match="exclude each other"):
        lrd_fx.compile(model, (X,), ratio=0.5, rank="full")
    assert state_hash(model) == before


def test_cli_rank_without_ratio_is_one_rule(monkeypatch, capsys):
    import lrd_fx.models
    from lrd_fx.cli import main
    monkeypatch.setattr(lrd_fx.models, "create_model", lambda name: small_model())
    assert main(["compile", "tiny", "--rank", "2", "--input", "1x16x4x4"]) == 0
    assert "rank=2" in capsys.readouterr().out
    assert main(["compile", "tiny", "--rank", "2", "--ratio", "0.5", "--input", "1x16x4x4"]) == 2
    assert "exclude each other" in capsys.readouterr().err


# --- empty example batches ---------------------------------------------------------------------------

class _Never:
    def __call__(self, module, shape, mode):
        raise AssertionError("nothing may be timed on an empty batch")


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_empty_batch_with_a_search_is_an_input_error(mode):
    model = small_model()
    with use_cost_fn(_Never()), pytest.raises(InputError, match=r"example_inputs\[0\] has shape \(0, 16, 4, 4\)"):
        lrd_fx.compile(model, (torch.randn(0, 16, 4, 4),), rank_search=mode, progress=False)


def test_empty_batch_with_the_whole_model_check_is_an_input_error():
    with use_cost_fn(_Never()), pytest.raises(InputError, match=r"example_inputs\[0\] has shape \(0, 16, 4, 4\)"):
        lrd_fx.compile(small_model(), (torch.randn(0, 16, 4, 4),), whole_model_check=True, progress=False)


def test_empty_tensor_nested_in_the_inputs_is_named():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x, extra):
            return self.fc(x) + extra[0].sum()

    with use_cost_fn(_Never()), pytest.raises(InputError, match=r"example_inputs\[1\]\[0\] has shape \(3, 0\)"):
        lrd_fx.compile(Two(), (torch.randn(2, 16), [torch.randn(3, 0)]), rank_search="infer", progress=False)


def test_empty_batch_without_a_search_still_compiles():
    # Without a search nothing is timed: shapes and factorization do not need a sample
    model = small_model()
    gm = lrd_fx.compile(model, (torch.randn(0, 16, 4, 4),), rank="full", min_channels=1, progress=False)
    x = torch.randn(3, 16, 4, 4)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)


# --- grouped options: RankSearch, Timing, Freeze, Calibration; the flat keywords as shorthand ----------

from lrd_fx import Calibration, Freeze, RankSearch, Timing  # noqa: E402
from lrd_fx.config import SHORTHAND  # noqa: E402


def test_shorthand_builds_the_same_config_as_the_sub_configs():
    flat = Config(rank_search="train", rank_search_window=0.3, rank_search_margin=0.05, rank_budget=0.5,
                  amp="off", rank_search_repeats=3, cache=False, freeze="static", freeze_group="outer",
                  freeze_period=2, calibration_mode="oneshot", calibration_damping=0.1, recalibrate_bn=False)
    grouped = Config(rank_search=RankSearch(mode="train", window=0.3, margin=0.05, param_budget=0.5),
                     timing=Timing(amp="off", repeats=3, cache=False),
                     freeze=Freeze("static", period=2, group="outer"),
                     calibrate=Calibration(mode="oneshot", damping=0.1, recalibrate_bn=False))
    assert flat == grouped
    assert flat.rank_search.window == 0.3 and flat.freeze.group == "outer" and flat.timing.repeats == 3
    # the Config holds the grouped fields only: no flat field is left
    names = {f.name for f in dataclasses.fields(Config)}
    assert not names & set(SHORTHAND) and {"rank_search", "timing", "freeze", "calibrate"} <= names
    assert set(SHORTHAND) <= set(Config.option_names())


def test_defaults_and_toggles():
    cfg = Config()
    assert cfg.rank_search is None and cfg.freeze is None           # stages off
    assert cfg.timing == Timing() and cfg.calibrate == Calibration()
    assert Config(rank_search="infer").rank_search == RankSearch()  # mode "infer", default options
    assert Config(freeze="sequential").freeze == Freeze()
    fn = lambda epoch, layer, role: True  # noqa: E731
    assert Config(freeze=fn).freeze.schedule is fn


def test_replace_applies_shorthand_on_top_of_the_sub_config_in_force():
    cfg = Config(rank_search=RankSearch(window=0.3, prefer="accuracy"), freeze=Freeze(period=3))
    a = cfg.replace(rank_search_margin=0.1)
    assert (a.rank_search.window, a.rank_search.margin, a.rank_search.prefer) == (0.3, 0.1, "accuracy")
    b = cfg.replace(rank_search="train", freeze="static")       # a new mode / schedule keeps the options
    assert b.rank_search == RankSearch(mode="train", window=0.3, prefer="accuracy")
    assert b.freeze == Freeze("static", period=3)
    assert cfg.replace(rank_search=None).rank_search is None       # None turns the stage off
    assert cfg.rank_search.margin == 0.03 and cfg.freeze.schedule == "sequential"   # cfg itself unchanged
    c = cfg.replace(rank_search=RankSearch(mode="train"), rank_search_window=0.1)    # shorthand on the given one
    assert c.rank_search == RankSearch(mode="train", window=0.1)


@pytest.mark.parametrize("kwargs", [dict(rank_search_window=0.3), dict(rank_budget=0.5),
                                    dict(freeze_period=2), dict(freeze_group="outer")])
def test_options_of_a_stage_that_is_off_are_an_error(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ConfigError, match=f"{name}=.*off"):
        Config(**kwargs)
    with pytest.raises(ConfigError, match=f"{name}=.*off"):
        Config(rank_search="infer", freeze="sequential").replace(rank_search=None, freeze=None, **kwargs)


@pytest.mark.parametrize("flat", sorted(SHORTHAND))
def test_every_shorthand_is_type_checked_and_named(flat):
    on = {"rank_search": dict(rank_search="infer"), "freeze": dict(freeze="sequential")}.get(SHORTHAND[flat][0], {})
    with pytest.raises(ConfigError, match=flat):
        Config(**{flat: _Foreign()}, **on)


def test_sub_configs_are_frozen_and_validated_when_built():
    rs = RankSearch(window=0.3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rs.window = 0.5
    for bad, name in [(lambda: RankSearch(window=2), "RankSearch: rank_search_window"),
                      (lambda: RankSearch(mode="fast"), "RankSearch: rank_search="),
                      (lambda: Timing(repeats=0), "Timing: rank_search_repeats"),
                      (lambda: Freeze("zigzag"), "Freeze: freeze='zigzag'.*sequential"),
                      (lambda: Freeze(period=0), "Freeze: freeze_period"),
                      (lambda: Calibration(damping=-1), "Calibration: calibration_damping")]:
        with pytest.raises(ConfigError, match=name):
            bad()
    assert type(RankSearch(budget_s=np.int64(5)).budget_s) is int     # numpy ints become ints
    assert type(Freeze(period=np.int64(2)).period) is int


def test_unknown_names_and_wrong_sub_config_types():
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['rank_search_windw'\].*rank_search_window"):
        Config(rank_search_windw=0.3)
    with pytest.raises(ConfigError, match="unknown option"):
        Config().replace(freeze_periods=2)
    with pytest.raises(ConfigError, match="timing=.*lrd_fx.Timing"):
        Config(timing=Freeze())
    with pytest.raises(ConfigError, match="calibration= takes the calibration batches.*calibrate="):
        lrd_fx.compile(small_model(), (X,), calibration=Calibration())


def test_validate_reports_a_sub_config_assigned_later_without_changing_it():
    cfg = Config(rank_search="infer")
    before = dataclasses.astuple(cfg)
    cfg.validate()
    assert dataclasses.astuple(cfg) == before
    cfg.rank_search = "train"                     # a plain mode assigned after construction is not converted
    with pytest.raises(ConfigError, match="rank_search='train' must be None.*RankSearch"):
        cfg.validate()
    assert cfg.rank_search == "train"


def test_compile_takes_the_shorthand_and_config_objects():
    model = small_model()
    with use_cost_fn(lambda module, shape, mode: 1.0):
        gm = lrd_fx.compile(model, (X,), rank=4, rank_search="infer", rank_search_window=0.1, freeze="sequential",
                            freeze_period=2, progress=False, whole_model_check=False)
        gm2 = lrd_fx.compile(model, (X,), config=Config(rank=4, rank_search=RankSearch(window=0.1),
                                                        freeze=Freeze(period=2)),
                             progress=False, whole_model_check=False)
    for g in (gm, gm2):
        assert g.lrd.config.rank_search == RankSearch(window=0.1) and g.lrd.config.freeze == Freeze(period=2)
        assert g.lrd.freezer.schedule.period == 2
    assert gm.lrd.plan == gm2.lrd.plan


def test_saved_header_holds_the_sub_configs_as_json(tmp_path):
    import json

    from safetensors import safe_open
    from lrd_fx.cost import model as cm

    def own_rule(curve, **kw):            # a cost model given as a function: used, but not written to the file
        return cm.choose(curve, model="staircase", **kw)

    model = small_model()
    with use_cost_fn(lambda module, shape, mode: 1.0):
        gm = lrd_fx.compile(model, (X,), rank=4, rank_search="infer", rank_search_window=0.1, progress=False,
                            rank_search_cost_model=own_rule, whole_model_check=False, freeze="static",
                            freeze_group="outer")
    assert gm.lrd.config.rank_search.cost_model is own_rule
    lrd_fx.save(gm, tmp_path / "m.lrd")
    with safe_open(str(tmp_path / "m.lrd"), "pt") as f:
        header = json.loads(f.metadata()["lrd_fx"])
    cfg = header["config"]
    assert cfg["rank_search"]["window"] == 0.1 and cfg["rank_search"]["mode"] == "infer"
    assert cfg["timing"]["repeats"] == 7 and cfg["calibrate"]["mode"] == "sequential"
    assert "rank_search.cost_model" in header["config_not_saved"]     # a function is not written
    assert header["freeze"] == {"schedule": "static", "freeze_period": 1, "freeze_group": "outer"}
    gm2 = lrd_fx.load(model, tmp_path / "m.lrd")
    assert gm2.lrd.config.freeze == Freeze("static", group="outer")
    torch.testing.assert_close(gm2.eval()(X), gm.eval()(X))


def test_time_error_objective_rejects_a_cost_model_without_errors():
    # "staircase" is time-only: with objective="time+error" the search would pass it errors= and fail
    with pytest.raises(lrd_fx.ConfigError, match="does not take them"):
        lrd_fx.Config(rank_search="infer", rank_search_objective="time+error", rank_search_cost_model="staircase")

    def with_errors(curve, *, errors, error_weight, **kw):
        return None

    cfg = lrd_fx.Config(rank_search="infer", rank_search_objective="time+error",
                        rank_search_cost_model=with_errors)
    assert cfg.rank_search.cost_model is with_errors
    cfg = lrd_fx.Config(rank_search="infer", rank_search_objective="time+error",
                        rank_search_cost_model="time+error")
    assert cfg.rank_search.cost_model == "time+error"
