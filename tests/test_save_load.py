"""save/load: a safetensors file with a JSON header; loading runs no code, honours no path from the file,
takes only options that keep the saved architecture, and names every bad file."""
import json
import math
import os
import pickle

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lrd_fx
from lrd_fx import freezing
from lrd_fx.cost.timer import use_cost_fn
from lrd_fx.factorize import FactorChain

from conftest import Wrapper, state_hash

X = torch.randn(2, 3, 8, 8)


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 10))


def compiled(model=None, **kw):
    kw.setdefault("ratio", 0.5)
    kw.setdefault("progress", False)
    model = model or small_cnn()
    gm = lrd_fx.compile(model, (X,), **kw)
    gm.train()
    with torch.no_grad():
        gm(X)              # BatchNorm running statistics move away from their initial values
    return model, gm.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(original model, compiled model, its file): one compile shared by the tests that only read them."""
    model, gm = compiled()
    path = tmp_path_factory.mktemp("saved") / "m.lrd"
    lrd_fx.save(gm, path)
    return model, gm, path


def legacy_config(**changes) -> dict:
    """The config as files written before Config was grouped hold it (lrd_fx/1, and lrd_fx/2 until then):
    the flat fields of that time, callables dropped."""
    cfg = dict(ratio=0.5, rank=None, energy=None, conv_scheme="tucker2", min_channels=8, skip=[],
               decompose_linear=True, decompose_conv=True, leaf_modules=[], fallback=True, rank_search=None,
               rank_search_window=0.25, rank_search_margin=0.03, rank_search_prefer="speed",
               rank_search_objective="time", rank_search_error_weight=1.0, rank_search_budget_s=None,
               rank_budget=None, rank_search_repeats=7, amp=None, align="auto", rank_search_exec="auto",
               whole_model_check=None, cache=True, progress=False, freeze=None, freeze_period=1,
               freeze_group="core", fuse_inference=False, calibration_mode="sequential",
               calibration_damping=0.01, recalibrate_bn=True, debug=False, dump_dir=None, check_inputs=True)
    cfg.update(changes)
    return cfg


def header_of(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["lrd_fx"])


def rewrite_header(src, dst, edit) -> None:
    """Write `dst`: the tensors of `src` with its lrd_fx header changed by `edit(header)`."""
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
    header = json.loads(meta["lrd_fx"])
    edit(header)
    meta["lrd_fx"] = json.dumps(header)
    save_file(load_file(str(src)), str(dst), metadata=meta)


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=0, msg=k)


# --- files that carry code ------------------------------------------------------------------------

class Payload:
    """Unpickling this creates `marker`: proof that a load ran code from the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_pickle_payload_does_not_run(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.lrd"
    path.write_bytes(pickle.dumps({"format": "lrd_fx/2", "x": Payload(marker)}, protocol=protocol))
    with pytest.raises(lrd_fx.LoadError) as e:
        lrd_fx.load(small_cnn(), path)
    assert not marker.exists()
    assert "pickle" in str(e.value) or "not an lrd_fx file" in str(e.value)


@pytest.mark.parametrize("zipfile", [True, False])
def test_payload_in_old_format_file_does_not_run(tmp_path, zipfile, saved):
    model, gm, _ = saved
    marker = tmp_path / "pwned"
    path = tmp_path / "old.pt"
    torch.save({"format": "lrd_fx/1", "config": {"ratio": 0.5}, "plan": gm.lrd.plan,
                "state_dict": gm.state_dict(), "extra": Payload(marker)}, path,
               _use_new_zipfile_serialization=zipfile)
    with pytest.raises(lrd_fx.LoadError, match="trust_file=True") as e:
        lrd_fx.load(model, path)
    with pytest.raises(lrd_fx.LoadError, match="trust_file='yes'"):
        lrd_fx.load(model, path, trust_file="yes")
    assert "lrd_fx/1" in str(e.value) and "lrd_fx.save" in str(e.value)
    assert not marker.exists()


def test_old_format_converts_with_trust_file(tmp_path):
    model, gm = compiled(freeze="sequential")
    gm.lrd.freezer.set_epoch(3)
    old = tmp_path / "old.pt"
    # what lrd_fx.save wrote before format lrd_fx/2
    cfg = legacy_config(freeze="sequential")
    torch.save({"format": "lrd_fx/1", "config": cfg, "plan": gm.lrd.plan, "state_dict": gm.state_dict()}, old)
    with pytest.raises(lrd_fx.LoadError):
        lrd_fx.load(model, old)
    gm2 = lrd_fx.load(model, old, trust_file=True)
    new = tmp_path / "new.lrd"
    lrd_fx.save(gm2, new)
    gm3 = lrd_fx.load(model, new)
    assert gm3.lrd.freezer.epoch == 3
    assert_same_state(gm, gm3)
    torch.testing.assert_close(gm3.eval()(X), gm(X))
    # an old file whose schedule was a function (dropped by the old save): the caller must say what to do
    cfg["freeze"] = None
    torch.save({"format": "lrd_fx/1", "config": cfg, "plan": gm.lrd.plan, "state_dict": gm.state_dict()}, old)
    with pytest.raises(lrd_fx.LoadError, match="no saved schedule"):
        lrd_fx.load(model, old, trust_file=True)
    assert lrd_fx.load(model, old, trust_file=True, freeze="sequential").lrd.freezer.epoch == 3
    assert lrd_fx.load(model, old, trust_file=True, freeze=None).lrd.freezer is None


def test_paths_and_printing_in_a_file_are_not_honoured(tmp_path, capsys, saved):
    model, gm, good = saved
    evil = tmp_path / "evil_dump"
    evil_cache = tmp_path / "evil_cache.sqlite"

    def edit(h):
        h["config"].update(dump_dir=str(evil), debug=True, progress=True, cache=str(evil_cache),
                           rank_search="infer", ratio=0.9)
    rewrite_header(good, tmp_path / "edited.lrd", edit)
    capsys.readouterr()
    gm2 = lrd_fx.load(model, tmp_path / "edited.lrd", (X,))
    assert not evil.exists() and not evil_cache.exists()
    assert capsys.readouterr().out == ""
    assert gm2.lrd.config.dump_dir is None and gm2.lrd.config.debug is False
    assert gm2.lrd.plan["3"]["ranks"] == gm.lrd.plan["3"]["ranks"]     # the plan, not the edited ratio
    # the caller's own dump_dir/debug are honoured
    mine = tmp_path / "mine"
    lrd_fx.load(model, good, dump_dir=str(mine), debug=True)
    assert mine.is_dir() and any(mine.iterdir())
    assert "decompose" in capsys.readouterr().out


# --- round trips ------------------------------------------------------------------------------------

def test_roundtrip_same_outputs_plan_and_buffers(tmp_path, saved):
    model, gm, _ = saved
    before = state_hash(model)
    path = tmp_path / "model.safetensors.custom"        # any name: the user's path is kept as given
    lrd_fx.save(gm, path)
    assert [f for f in os.listdir(tmp_path) if not f.startswith("timings")] == [path.name]   # no temp file left
    gm2 = lrd_fx.load(model, path)
    assert gm2.lrd.plan == gm.lrd.plan
    assert_same_state(gm, gm2)                         # BatchNorm running stats included
    torch.testing.assert_close(gm2.eval()(X), gm(X))
    assert state_hash(model) == before
    assert any("loaded from" in n for n in gm2.lrd.notes)
    h = header_of(path)
    assert h["format"] == "lrd_fx/2" and h["lrd_fx_version"] == lrd_fx.__version__
    assert h["torch_version"] == torch.__version__ and h["plan"] == gm.lrd.plan
    assert h["config"]["ratio"] == 0.5 and h["freeze"] is None


def test_a_different_model_is_named(saved):
    _, _, path = saved
    wider = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 48, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(48, 24), nn.ReLU(), nn.Linear(24, 10))
    with pytest.raises(lrd_fx.LoadError, match="compiled from"):
        lrd_fx.load(wider, path)
    shorter = nn.Sequential(*list(small_cnn())[:7], nn.Linear(32, 10))
    with pytest.raises(lrd_fx.LoadError, match="'9'"):
        lrd_fx.load(shorter, path)


def test_model_traced_in_parts_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = Wrapper()                  # its `body` does not trace whole: traced child by child
    x = torch.randn(3, 32)
    gm = lrd_fx.compile(model, (x,), ratio=0.5, freeze="sequential", progress=False)
    assert gm.lrd.fallback_parts
    gm.lrd.freezer.set_epoch(1)
    lrd_fx.save(gm, tmp_path / "w.lrd")
    gm2 = lrd_fx.load(model, tmp_path / "w.lrd")
    assert gm2.lrd.plan == gm.lrd.plan and gm2.lrd.freezer.epoch == 1
    assert_same_state(gm, gm2)
    torch.testing.assert_close(gm2(x), gm(x))


class FakeCost:
    """Chains cost 1 + rank/1000 + 0.2 per started block of 8 ranks; originals 10 (Linear 0.001: reverted)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, module, shape, mode):
        self.calls += 1
        if isinstance(module, FactorChain):
            r = (module.core.out_channels if "core" in module.roles()
                 else getattr(module.first, "out_features", None) or module.first.out_channels)
            return 1.0 + 0.001 * r + 0.2 * math.ceil(r / 8)
        return 0.001 if isinstance(module, nn.Linear) else 10.0


def test_roundtrip_rank_search_plan_without_searching_again(tmp_path):
    model = small_cnn()
    fake = FakeCost()
    with use_cost_fn(fake):
        gm = lrd_fx.compile(model, (X,), ratio=0.5, rank_search="infer", progress=False, cache=False)
    decisions = {r["decision"] for r in gm.lrd.plan.values()}
    assert {"searched", "reverted"} <= decisions and fake.calls > 0
    path = tmp_path / "searched.lrd"
    lrd_fx.save(gm, path)

    def no_timing(module, shape, mode):
        raise AssertionError("load must not time anything")
    with use_cost_fn(no_timing):
        gm2 = lrd_fx.load(model, path, (X,))
    assert gm2.lrd.plan == gm.lrd.plan          # decisions, reasons and measured times restored
    assert gm2.lrd.config.rank_search is None
    assert_same_state(gm.eval(), gm2)
    torch.testing.assert_close(gm2.eval()(X), gm(X))
    assert "reverted" in gm2.lrd.report()


def test_roundtrip_sequential_freezing_restores_epoch_and_period(tmp_path):
    model, gm = compiled(freeze="sequential", freeze_period=2)
    gm.lrd.freezer.set_epoch(5)
    path = tmp_path / "f.lrd"
    lrd_fx.save(gm, path)
    assert header_of(path)["freeze"]["schedule"] == "sequential"
    gm2 = lrd_fx.load(model, path)
    fr = gm2.lrd.freezer
    assert fr.epoch == 5 and fr.schedule.period == 2 and fr.frozen_now() == gm.lrd.freezer.frozen_now()
    assert_same_state(gm, gm2)
    torch.testing.assert_close(gm2.eval()(X), gm(X))
    # another schedule at load: the epoch is kept
    gm3 = lrd_fx.load(model, path, freeze="static", freeze_group="outer")
    assert gm3.lrd.freezer.epoch == 5 and gm3.lrd.freezer.schedule.group == "outer"
    # freeze=None drops the gates (and their epoch): same weights and outputs, nothing gated
    gm4 = lrd_fx.load(model, path, freeze=None)
    assert gm4.lrd.freezer is None and not freezing.is_gated(gm4)
    torch.testing.assert_close(gm4.eval()(X), gm(X))


def test_schedule_switched_after_compile_is_what_is_saved(tmp_path):
    model, gm = compiled(freeze="sequential")
    gm.lrd.freezer.set_schedule("static")
    lrd_fx.save(gm, tmp_path / "s.lrd")
    gm2 = lrd_fx.load(model, tmp_path / "s.lrd")
    assert isinstance(gm2.lrd.freezer.schedule, freezing.StaticSchedule)


def test_gates_added_at_load_start_at_epoch_zero(saved):
    model, gm, path = saved
    gm2 = lrd_fx.load(model, path, freeze="sequential", freeze_period=3)
    assert gm2.lrd.freezer.epoch == 0 and gm2.lrd.freezer.schedule.period == 3
    torch.testing.assert_close(gm2.eval()(X), gm(X))
    with pytest.raises(lrd_fx.LoadError, match="freeze_period"):
        lrd_fx.load(model, path, freeze_period=2)
    gm3 = lrd_fx.load(model, path, freeze=lambda epoch, layer, role: role != "core")   # a function is fine here
    assert gm3.lrd.freezer.frozen_now() and all(k.endswith(".core") for k in gm3.lrd.freezer.frozen_now())


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.body = nn.Linear(32, 32)
        self.head = nn.Linear(32, 50, bias=False)
        self.head.weight = self.emb.weight          # tied: one tensor under two names

    def forward(self, ids):
        return self.head(torch.relu(self.body(self.emb(ids))))


def test_tied_weights_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = TiedLM()
    ids = torch.randint(0, 50, (2, 7))
    gm = lrd_fx.compile(model, (ids,), ratio=0.5, skip=("head",), progress=False)
    assert gm.get_submodule("head").weight is gm.get_submodule("emb").weight
    path = tmp_path / "tied.lrd"
    lrd_fx.save(gm, path)
    h = header_of(path)
    assert h["aliases"] == {"head.weight": "emb.weight"}
    assert "head.weight" not in load_file(str(path))          # written once
    gm2 = lrd_fx.load(model, path)
    assert gm2.get_submodule("head").weight is gm2.get_submodule("emb").weight
    assert_same_state(gm, gm2)
    torch.testing.assert_close(gm2(ids), gm(ids))


class Overlapping(nn.Module):
    """A buffer that is a view into a parameter (shares storage, not identical): written as a copy."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.register_buffer("rows", self.fc.weight.data[:4])

    def forward(self, x):
        return self.fc(x) + self.rows.sum()


def test_overlapping_tensors_are_written_as_copies(tmp_path):
    model = Overlapping()
    x = torch.randn(3, 16)
    gm = lrd_fx.compile(model, (x,), ratio=0.5, skip=("fc",), progress=False)
    lrd_fx.save(gm, tmp_path / "o.lrd")
    gm2 = lrd_fx.load(model, tmp_path / "o.lrd")
    assert_same_state(gm, gm2)
    torch.testing.assert_close(gm2(x), gm(x))


# --- custom schedules -------------------------------------------------------------------------------

class EveryOther(freezing.Schedule):
    name = "every_other"

    def trainable(self, epoch, layer, role, scheme):
        return (epoch + (role == "core")) % 2 == 0


def test_unregistered_schedules_are_refused_at_save(tmp_path):
    for freeze in (lambda epoch, layer, role: epoch % 2 == 0, EveryOther()):
        _, gm = compiled(freeze=freeze)
        with pytest.raises(lrd_fx.SaveError, match="register_schedule"):
            lrd_fx.save(gm, tmp_path / "c.lrd")
        assert not (tmp_path / "c.lrd").exists()
    # stripped of its gates, the same model saves
    lrd_fx.save(lrd_fx.strip_gates(gm), tmp_path / "c.lrd")
    assert header_of(tmp_path / "c.lrd")["freeze"] is None


def test_registered_schedule_saves_by_name(tmp_path, monkeypatch):
    monkeypatch.setitem(freezing.SCHEDULES, "every_other", lambda config: EveryOther())
    model, gm = compiled(freeze="every_other")
    gm.lrd.freezer.set_epoch(1)
    lrd_fx.save(gm, tmp_path / "r.lrd")
    assert header_of(tmp_path / "r.lrd")["freeze"]["schedule"] == "every_other"
    gm2 = lrd_fx.load(model, tmp_path / "r.lrd")
    assert type(gm2.lrd.freezer.schedule) is EveryOther and gm2.lrd.freezer.epoch == 1
    assert gm2.lrd.freezer.frozen_now() == gm.lrd.freezer.frozen_now()
    monkeypatch.delitem(freezing.SCHEDULES, "every_other")
    with pytest.raises(lrd_fx.LoadError, match="every_other.*register"):
        lrd_fx.load(model, tmp_path / "r.lrd")
    assert lrd_fx.load(model, tmp_path / "r.lrd", freeze="sequential").lrd.freezer.epoch == 1


# --- options at load --------------------------------------------------------------------------------

@pytest.mark.parametrize("option, value", [("ratio", 0.5), ("rank", 4), ("energy", 0.9), ("rank_search", "infer"),
                                           ("conv_scheme", "svd"), ("skip", ("0",)), ("bogus", 1),
                                           ("calibration", [X])])
def test_options_that_change_the_architecture_are_refused(saved, option, value):
    model, _, path = saved
    with pytest.raises(lrd_fx.LoadError, match=f"{option}="):
        lrd_fx.load(model, path, **{option: value})


def test_allowed_options_apply(saved):
    model, _, path = saved
    gm2 = lrd_fx.load(model, path, (X,), progress=False, check_inputs=False)
    assert gm2.lrd.config.progress is False and gm2.lrd.config.check_inputs is False
    with pytest.raises(lrd_fx.InputError):                  # inputs are checked as compile checks them
        lrd_fx.load(model, path, (torch.randn(2, 5, 8, 8),))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return self.fc(x)


def test_leaf_module_classes_must_be_passed_again(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), Block())
    x = torch.randn(2, 16)
    gm = lrd_fx.compile(model, (x,), ratio=0.5, leaf_modules=(Block,), progress=False)
    lrd_fx.save(gm, tmp_path / "l.lrd")
    assert header_of(tmp_path / "l.lrd")["config"]["leaf_classes"] == [f"{__name__}.Block"]
    with pytest.raises(lrd_fx.LoadError, match="leaf_modules"):
        lrd_fx.load(model, tmp_path / "l.lrd")
    with pytest.raises(lrd_fx.LoadError, match="differs"):
        lrd_fx.load(model, tmp_path / "l.lrd", leaf_modules=(nn.ReLU,))
    gm2 = lrd_fx.load(model, tmp_path / "l.lrd", leaf_modules=(Block,))
    assert gm2.lrd.plan.keys() == gm.lrd.plan.keys()
    torch.testing.assert_close(gm2(x), gm(x))


# --- bad files --------------------------------------------------------------------------------------

def test_foreign_truncated_and_damaged_files(tmp_path, saved):
    model, _, good = saved
    data = good.read_bytes()
    cases = {}
    (tmp_path / "text.txt").write_text("hello, not a model\n")
    cases["text.txt"] = "not an lrd_fx file"
    (tmp_path / "empty").write_bytes(b"")
    cases["empty"] = "empty"
    save_file({"w": torch.zeros(3)}, str(tmp_path / "foreign.safetensors"))
    cases["foreign.safetensors"] = "not one written by lrd_fx.save"
    (tmp_path / "cut_header").write_bytes(data[:40])
    cases["cut_header"] = "truncated"
    (tmp_path / "cut_tensors").write_bytes(data[:-10])
    cases["cut_tensors"] = "truncated"
    rewrite_header(good, tmp_path / "newer", lambda h: h.update(format="lrd_fx/3", lrd_fx_version="9.0"))
    cases["newer"] = "newer than this lrd_fx"
    rewrite_header(good, tmp_path / "noplan", lambda h: h.pop("plan"))
    cases["noplan"] = "missing the 'plan'"
    only = tmp_path / "only_format"
    save_file({"w": torch.zeros(1)}, str(only), metadata={"lrd_fx": json.dumps({"format": "lrd_fx/2"})})
    cases["only_format"] = "missing the 'plan'"
    rewrite_header(good, tmp_path / "badranks", lambda h: h["plan"]["3"].update(ranks="abc"))
    cases["badranks"] = "plan entry '3' is malformed"
    rewrite_header(good, tmp_path / "baddecision", lambda h: h["plan"]["0"].update(decision="rm -rf"))
    cases["baddecision"] = "decision"
    rewrite_header(good, tmp_path / "badalias", lambda h: h.update(aliases={"x": "nope"}))
    cases["badalias"] = "lacks"
    rewrite_header(good, tmp_path / "badreason", lambda h: h["plan"]["0"].update(reason={"x": 1}))
    cases["badreason"] = "reason=.*wrong type"
    # every record field is checked against its type (LayerRecord's annotations)
    for field, value in (("kind", 3), ("params_after", "many"), ("in_shape", "2x3"), ("candidates", [1]),
                         ("fallback", 1.5), ("time_chosen_s", "fast"), ("estimate", [0])):
        rewrite_header(good, tmp_path / f"bad_{field}", lambda h, f=field, v=value: h["plan"]["0"].update({f: v}))
        cases[f"bad_{field}"] = f"{field}=.*wrong type"
    rewrite_header(good, tmp_path / "badnone", lambda h: h.update(traced_none="mask"))
    cases["badnone"] = "traced_none entry is not a JSON list"
    rewrite_header(good, tmp_path / "othernone", lambda h: h.update(traced_none=["mask"]))
    cases["othernone"] = "forward takes 'mask'"
    rewrite_header(good, tmp_path / "baddefaults", lambda h: h.update(traced_defaults={"flag": [1]}))
    cases["baddefaults"] = "traced_defaults entry is not a JSON object"
    rewrite_header(good, tmp_path / "otherdefaults", lambda h: h.update(traced_defaults={"flag": True}))
    cases["otherdefaults"] = "forward takes 'flag'"
    deep = tmp_path / "deep"
    save_file({"w": torch.zeros(1)}, str(deep), metadata={"lrd_fx": "[" * 200_000})
    cases["deep"] = "not valid JSON"
    raw = b'{"a":' + b"[" * 200_000
    (tmp_path / "deep_raw").write_bytes(len(raw).to_bytes(8, "little") + raw)
    cases["deep_raw"] = "not an lrd_fx file"
    # found by fuzzing (2026-11-29): each was a TypeError, ValueError or OverflowError, or a wrong model
    rewrite_header(good, tmp_path / "alias_list", lambda h: h.update(aliases={"1.bias": ["0.bias"]}))
    cases["alias_list"] = "alias table is malformed"
    rewrite_header(good, tmp_path / "alias_stored", lambda h: h.update(aliases={"1.bias": "1.weight"}))
    cases["alias_stored"] = "both stored and recorded"
    rewrite_header(good, tmp_path / "leaf_int", lambda h: h["config"].update(leaf_modules=3))
    cases["leaf_int"] = "leaf_modules is not a list"
    rewrite_header(good, tmp_path / "freezer_int", lambda h: h.update(freezer_keys=3))
    cases["freezer_int"] = "freezer keys are malformed|has freezing gates but no saved schedule"
    rewrite_header(good, tmp_path / "format_digits", lambda h: h.update(format="lrd_fx/" + "9" * 5000))
    cases["format_digits"] = "valid format field"
    sd = load_file(str(good))
    with safe_open(str(good), "pt") as f:
        meta = f.metadata()
    for name, edit in (("bool_weight", lambda t: t != 0), ("nan_weight", lambda t: t * float("nan"))):
        bad = dict(sd)
        key = next(k for k, t in sd.items() if k.endswith("weight") and t.dtype.is_floating_point)
        bad[key] = edit(sd[key])
        save_file(bad, str(tmp_path / name), metadata=meta)
    cases["bool_weight"] = "torch.bool in the file but torch.float32"
    cases["nan_weight"] = "holds NaN values"
    n = int.from_bytes(data[:8], "little")
    outer = json.loads(data[8:8 + n])
    first = next(k for k in outer if k != "__metadata__")
    outer[first]["data_offsets"] = [0, 10 ** 400]     # read by Python's json as an integer, by others as inf
    raw = json.dumps(outer).encode()
    (tmp_path / "offsets_huge").write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    cases["offsets_huge"] = "valid data offsets|truncated"
    for name, words in cases.items():
        with pytest.raises(lrd_fx.LoadError, match=words):
            lrd_fx.load(model, tmp_path / name)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)                                   # opening it to read would block forever
    with pytest.raises(lrd_fx.LoadError, match="not a regular file"):
        lrd_fx.load(model, fifo)
    with pytest.raises(lrd_fx.LoadError, match="no such file"):
        lrd_fx.load(model, tmp_path / "missing.lrd")
    with pytest.raises(lrd_fx.LoadError, match="directory"):
        lrd_fx.load(model, tmp_path)
    with pytest.raises(lrd_fx.LoadError, match="nn.Module"):
        lrd_fx.load("not a model", good)
    with pytest.raises(lrd_fx.LoadError, match="original model"):
        lrd_fx.load(lrd_fx.load(model, good), good)


def test_weights_that_do_not_fit_are_named(tmp_path, saved):
    model, _, good = saved
    sd = load_file(str(good))
    with safe_open(str(good), "pt") as f:
        meta = f.metadata()
    sd["1.running_mean"] = torch.zeros(5)
    save_file(sd, str(tmp_path / "shape"), metadata=meta)
    with pytest.raises(lrd_fx.LoadError, match="1.running_mean"):
        lrd_fx.load(model, tmp_path / "shape")
    del sd["1.running_mean"]
    save_file(sd, str(tmp_path / "missing"), metadata=meta)
    with pytest.raises(lrd_fx.LoadError, match="missing 1.running_mean"):
        lrd_fx.load(model, tmp_path / "missing")


def test_save_errors(tmp_path, saved):
    _, gm, _ = saved
    with pytest.raises(lrd_fx.SaveError, match="does not exist") as e:
        lrd_fx.save(gm, tmp_path / "no" / "such" / "dir" / "m.lrd")
    assert str(tmp_path / "no" / "such" / "dir") in str(e.value)
    assert not (tmp_path / "no").exists()
    with pytest.raises(lrd_fx.SaveError, match="is a directory"):
        lrd_fx.save(gm, tmp_path)
    with pytest.raises(lrd_fx.SaveError, match="lrd_fx.compile"):
        lrd_fx.save(small_cnn(), tmp_path / "x.lrd")
    with pytest.raises(lrd_fx.SaveError, match="file path"):
        lrd_fx.save(gm, 123)


def test_config_in_the_header_holds_data_only(tmp_path):
    _, gm = compiled(filter_fn=lambda name, m: True)
    lrd_fx.save(gm, tmp_path / "m.lrd")
    h = header_of(tmp_path / "m.lrd")
    assert "filter_fn" in h["config_not_saved"] and "filter_fn" not in h["config"]
    json.dumps(h)   # plain JSON throughout
    # every option is written (sub-configs as nested objects) or named as left out, recursively
    import dataclasses

    def check(obj, saved, path):
        for f in dataclasses.fields(obj):
            name = f"{path}{f.name}"
            v = getattr(obj, f.name)
            if name in h["config_not_saved"]:
                assert f.name not in saved
            elif dataclasses.is_dataclass(v):
                check(v, saved[f.name], name + ".")
            elif f.name != "leaf_modules":
                assert json.loads(json.dumps(saved[f.name])) == json.loads(json.dumps(v)), name
    check(gm.lrd.config, h["config"], "")


def test_files_with_the_flat_config_of_earlier_versions_load(tmp_path, saved):
    """Files written before Config was grouped hold flat options (rank_search_window, freeze_period, ...);
    load reads what it needs from them the same way."""
    model, gm, good = saved
    flat = tmp_path / "flat.lrd"
    rewrite_header(good, flat, lambda h: h.update(config=legacy_config(rank_search="infer", rank_search_window=0.5)))
    gm2 = lrd_fx.load(model, flat)
    assert gm2.lrd.config.rank_search is None                 # the plan fixes the ranks: nothing is searched
    assert {n: r["ranks"] for n, r in gm2.lrd.plan.items()} == {n: r["ranks"] for n, r in gm.lrd.plan.items()}
    torch.testing.assert_close(gm2.eval()(X), gm(X))


def test_hugging_face_gpt2_with_tied_head_roundtrip(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=100, n_positions=16,
                                       bos_token_id=0, eos_token_id=0)).eval()
    ids = torch.randint(0, 100, (2, 8))
    gm = lrd_fx.compile(model, (ids,), ratio=0.5, progress=False).eval()
    assert any(r["decision"] == "decomposed" for r in gm.lrd.plan.values())
    lrd_fx.save(gm, tmp_path / "gpt2.lrd")
    assert header_of(tmp_path / "gpt2.lrd")["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
    gm2 = lrd_fx.load(model, tmp_path / "gpt2.lrd").eval()
    assert gm2.get_submodule("lm_head").weight is gm2.get_submodule("transformer.wte").weight
    torch.testing.assert_close(gm2(ids).logits, gm(ids).logits)


def test_fused_models_roundtrip(tmp_path, saved):
    model, gm, _ = saved
    fused = lrd_fx.compile(model, (X,), ratio=0.5, fuse_inference=True, progress=False)
    lrd_fx.save(fused, tmp_path / "f.lrd")
    gm2 = lrd_fx.load(model, tmp_path / "f.lrd")
    assert "1.running_mean" not in gm2.state_dict()            # BatchNorm folded as in the saved model
    assert_same_state(fused, gm2)
    torch.testing.assert_close(gm2(X), fused(X))
    # fused after compile (lrd_fx.fuse): the file says so, whatever the compile options were
    later = lrd_fx.fuse(gm)
    assert later.lrd.config.fuse_inference is True and later.lrd.freezer is None   # the copy says what it is
    assert gm.lrd.config.fuse_inference is False                                   # the given model is unchanged
    lrd_fx.save(later, tmp_path / "later.lrd")
    assert header_of(tmp_path / "later.lrd")["config"]["fuse_inference"] is True
    gm3 = lrd_fx.load(model, tmp_path / "later.lrd")
    assert_same_state(later, gm3)
    torch.testing.assert_close(gm3(X), later(X))
