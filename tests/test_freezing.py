"""Freezing schedules and controller: groups per phase, optimizers, resume, torch.compile recompiles."""
import ast
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import lrd_fx
from lrd_fx.errors import FreezeError
from lrd_fx.freezing import (CallableSchedule, FreezeController, Schedule, SequentialSchedule,
                             StaticSchedule, make_schedule, register_schedule, schedule_names)
from lrd_fx.passes.gates import strip_gates


def small_model():
    # Tucker-2 conv, SVD 1x1 conv, SVD linear; BatchNorm and a depthwise conv stay unfactorized
    return nn.Sequential(
        nn.Conv2d(8, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=32),
        nn.Conv2d(32, 24, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10))


X = torch.randn(4, 8, 6, 6)
Y = torch.randint(0, 10, (4,))


def gated(**kw):
    torch.manual_seed(0)
    kw.setdefault("freeze", "sequential")
    return lrd_fx.compile(small_model(), (X,), ratio=0.5, **kw)


FACTORS = ["0.first", "0.core", "0.last", "4.first", "4.last", "8.first", "8.last"]


def test_sequential_phases_are_as_documented():
    gm = gated(freeze_period=2)
    fr = gm.lrd.freezer
    assert isinstance(fr, FreezeController) and fr is gm.lrd_freezer
    assert sorted(fr.factors) == sorted(FACTORS)
    phase0 = {"0.core", "4.last", "8.last"}            # Tucker-2 cores + SVD "last": frozen in phase 0
    phase1 = set(FACTORS) - phase0
    for epoch, frozen in [(0, phase0), (1, phase0), (2, phase1), (3, phase1), (4, phase0), (7, phase1)]:
        fr.set_epoch(epoch)
        assert set(fr.frozen_now()) == frozen, epoch
        assert set(fr.trainable_now()) == set(FACTORS) - frozen
    assert fr.state_epochs() == [0, 2]


@pytest.mark.parametrize("group,frozen", [
    ("core", {"0.core", "4.last", "8.last"}),
    ("outer", {"0.first", "0.last", "4.first", "8.first"}),
    ("first", {"0.first", "4.first", "8.first"}),
    ("last", {"0.last", "4.last", "8.last"}),
])
def test_static_groups(group, frozen):
    fr = gated(freeze="static", freeze_group=group).lrd.freezer
    for epoch in (0, 1, 5):
        fr.set_epoch(epoch)
        assert set(fr.frozen_now()) == frozen


def test_callable_schedule_gets_epoch_layer_role():
    calls = []

    def only_heads_late(epoch, layer, role):
        calls.append((epoch, layer, role))
        return not (layer == "8" and epoch >= 3)

    gm = gated(freeze=only_heads_late)
    fr = gm.lrd.freezer
    assert isinstance(fr.schedule, CallableSchedule)
    assert (0, "0", "core") in calls and (0, "8", "last") in calls
    assert fr.frozen_now() == []
    fr.set_epoch(3)
    assert sorted(fr.frozen_now()) == ["8.first", "8.last"]
    gm(X).sum().backward()
    assert gm.get_submodule("8.first").weight.grad is None
    assert gm.get_submodule("0.core").weight.grad is not None


def test_failing_callable_is_named():
    def bad(epoch, layer, role):
        if epoch == 2:
            raise KeyError("boom")
        return True

    fr = gated(freeze=bad).lrd.freezer
    with pytest.raises(FreezeError, match=r"schedule.*bad.*epoch 2.*boom"):
        fr.set_epoch(2)
    assert fr.epoch == 0                      # the failed call changed nothing


def test_registry_and_schedule_objects():
    @register_schedule("odd_cores")
    def _odd(config):
        class OddCores(Schedule):
            name = "odd_cores"

            def trainable(self, epoch, layer, role, scheme):
                return not (role == "core" and epoch % 2)
        return OddCores()

    assert "odd_cores" in schedule_names() and {"sequential", "static"} <= set(schedule_names())
    s = make_schedule("odd_cores")
    assert not s.trainable(1, "x", "core", "tucker2") and s.trainable(2, "x", "core", "tucker2")
    assert isinstance(make_schedule("sequential", lrd_fx.Freeze(period=3)), SequentialSchedule)
    assert isinstance(make_schedule(StaticSchedule("last")), StaticSchedule)
    with pytest.raises(FreezeError, match="not a known schedule.*sequential"):
        make_schedule("zigzag")
    with pytest.raises(FreezeError, match="freeze_period"):
        SequentialSchedule(0)
    with pytest.raises(FreezeError, match="freeze_group"):
        StaticSchedule("middle")


def test_controller_api_and_epoch_hook():
    fr = gated().lrd.freezer
    assert fr.epoch == 0 and fr.phase == 0
    assert fr.step_epoch() == 1 and fr.epoch == 1 and fr.phase == 1
    seen = []
    for e in fr.epochs(4):                    # continues from the current epoch
        seen.append((e, fr.epoch, tuple(fr.frozen_now())))
    assert [s[0] for s in seen] == [1, 2, 3] and all(a == b for a, b, _ in seen)
    assert seen[0][2] != seen[1][2] and seen[0][2] == seen[2][2]
    assert fr.epoch == 4                      # run to its end: the next epoch, not the last one again
    assert [e for e in fr.epochs(6)] == [4, 5] and fr.epoch == 6
    assert [e for e in fr.epochs(6)] == [] and fr.epoch == 6
    for e in fr.epochs(10, start=7):
        break                                 # left early: the epoch in progress stays
    assert fr.epoch == 7
    assert [e for e in fr.epochs(2, start=0)] == [0, 1]
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(FreezeError, match="epoch must be an int"):
            fr.set_epoch(bad)
    fr.set_epoch(torch.tensor(4))
    assert fr.epoch == 4
    assert "sequential" in repr(fr) and "epoch=4" in repr(fr)


def test_set_schedule_and_schedule_instances():
    gm = gated(freeze=StaticSchedule("first"))            # a Schedule instance is a valid freeze=
    fr = gm.lrd.freezer
    assert set(fr.frozen_now()) == {"0.first", "4.first", "8.first"}
    fr.set_epoch(3)
    fr.set_schedule("sequential")                           # epoch kept, state recomputed
    assert fr.epoch == 3 and set(fr.frozen_now()) == {"0.first", "0.last", "4.first", "8.first"}
    with pytest.raises(FreezeError, match="not a known schedule"):
        fr.set_schedule("nope")
    assert fr.schedule.name == "sequential"


def test_set_schedule_keeps_the_period_and_group():
    # issue 10: set_schedule("sequential") reset freeze_period to 1
    fr = gated(freeze_period=3).lrd.freezer
    fr.set_epoch(4)                                         # phase (4 // 3) % 2 = 1
    frozen = set(fr.frozen_now())
    fr.set_schedule("sequential")
    assert fr.schedule.period == 3 and fr.phase == 1 and set(fr.frozen_now()) == frozen
    fr.set_schedule("static")
    assert fr.schedule.group == "core"
    fr.set_schedule(StaticSchedule("last"))
    fr.set_schedule("sequential")                           # the period survives a detour
    assert fr.schedule.period == 3
    fr.set_schedule("static")                               # and so does the group
    assert fr.schedule.group == "last"
    fr.set_schedule(SequentialSchedule(2))                  # an instance says its own period
    fr.set_schedule("static")
    fr.set_schedule("sequential")
    assert fr.schedule.period == 2


def _train_epoch(gm, opt, steps=3, set_to_none=True):
    for _ in range(steps):
        opt.zero_grad(set_to_none=set_to_none)
        nn.functional.cross_entropy(gm(X), Y).backward()
        opt.step()


OPTIMIZERS = {
    "sgd_momentum_wd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adam_wd": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_frozen_weights_stay_bit_identical(opt_name, set_to_none):
    # set_to_none=False: zero_grad leaves a zero tensor in .grad of the weights trained the epoch
    # before; weight decay, momentum and Adam moved them by it (issue 10) until the gates reset it
    gm = gated()
    fr = gm.lrd.freezer
    opt = OPTIMIZERS[opt_name](gm.parameters())
    params = dict(gm.named_parameters())
    for epoch in range(3):                    # 0: side A trains, 1: side B trains, 2: side A again
        fr.set_epoch(epoch)
        frozen = fr.frozen_now()
        before = {n: p.detach().clone() for n, p in params.items()}
        _train_epoch(gm, opt, set_to_none=set_to_none)
        for n, p in params.items():
            owner = n.rpartition(".")[0]
            if owner in frozen:
                assert p.grad is None, (epoch, n)
                assert torch.equal(p, before[n]), (epoch, n)          # bit-identical
                if epoch > 0:
                    # it was trained in an earlier epoch: the optimizer has state for it, yet skips it
                    assert opt.state[p], (epoch, n)
            else:
                assert not torch.equal(p, before[n]), (epoch, n)      # trainable ones move


def test_non_factor_parameters_are_never_gated():
    gm = gated()
    fr = gm.lrd.freezer
    factor_params = {f"{k}.{w}" for k in fr.factors for w in ("weight", "bias")}
    others = [n for n, _ in gm.named_parameters() if n not in factor_params]
    assert {"1.weight", "1.bias", "3.weight", "3.bias"} <= set(others)
    for epoch in (0, 1):
        gm.zero_grad(set_to_none=True)
        fr.set_epoch(epoch)
        gm(X).sum().backward()
        for n, p in gm.named_parameters():
            if n in others:
                assert p.grad is not None, (epoch, n)


def test_state_dict_roundtrip_resumes_mid_schedule(tmp_path):
    gm = gated(freeze_period=2)
    fr = gm.lrd.freezer
    opt = torch.optim.SGD(gm.parameters(), lr=0.05)
    for epoch in fr.epochs(3):
        _train_epoch(gm, opt, steps=1)
    assert fr.epoch == 3                     # epochs 0..2 done: the counter names the next one
    path = tmp_path / "ckpt.pt"
    torch.save(gm.state_dict(), path)
    assert gm.state_dict()["lrd_freezer.current_epoch"].item() == 3

    fresh = gated(freeze_period=2)
    assert fresh.lrd.freezer.epoch == 0 and fresh.lrd.freezer.phase == 0
    fresh.load_state_dict(torch.load(path))
    ff = fresh.lrd.freezer
    assert ff.epoch == 3 and ff.phase == 1                  # (3 // 2) % 2
    assert ff.frozen_now() == fr.frozen_now() and set(ff.frozen_now()) == {"0.first", "0.last", "4.first", "8.first"}
    assert [e for e in ff.epochs(5)] == [3, 4]
    torch.testing.assert_close(fresh.eval()(X), gm.eval()(X))   # weights and BN stats restored too
    fresh.train()
    # the gates follow the loaded state, not the fresh one
    ff.set_epoch(3)
    fresh.zero_grad(set_to_none=True)
    fresh(X).sum().backward()
    assert fresh.get_submodule("0.first").weight.grad is None
    assert fresh.get_submodule("0.core").weight.grad is not None


def test_save_load_keeps_the_epoch(tmp_path):
    model = small_model()
    gm = lrd_fx.compile(model, (X,), ratio=0.5, freeze="sequential")
    gm.lrd.freezer.set_epoch(5)
    lrd_fx.save(gm, tmp_path / "m.pt")
    gm2 = lrd_fx.load(model, tmp_path / "m.pt", (X,))
    assert gm2.lrd.freezer.epoch == 5 and gm2.lrd.freezer.frozen_now() == gm.lrd.freezer.frozen_now()


def test_torch_compile_recompiles_once_per_schedule_state():
    import torch._dynamo as dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    gm = gated()
    fr = gm.lrd.freezer
    dynamo.reset()
    cnt = CompileCounterWithBackend("aot_eager")   # AOT autograd: the backward graph honours detach
    compiled = torch.compile(gm, backend=cnt)
    frames = []
    for epoch in range(6):
        fr.set_epoch(epoch)
        for _ in range(2):
            gm.zero_grad(set_to_none=True)
            compiled(X).sum().backward()
        frames.append(cnt.frame_count)
        # the compiled graph honours the gates
        for k in fr.factors:
            assert (gm.get_submodule(k).weight.grad is None) == (k in fr.frozen_now()), (epoch, k)
    assert frames == [1, 2, 2, 2, 2, 2]         # one compile per state (2 for sequential), not per epoch
    # strip_gates gives a plain model that compiles once and computes the same
    plain = strip_gates(gm).eval()
    gm.eval()
    torch.testing.assert_close(torch.compile(plain, backend="eager")(X), gm(X))
    dynamo.reset()


def _frozen_that_moved(step, gm, fr, epochs=3):
    moved = []
    for epoch in range(epochs):
        fr.set_epoch(epoch)
        before = {n: p.detach().clone() for n, p in gm.named_parameters()}
        for _ in range(2):
            step()
        moved += [(epoch, n) for n, p in gm.named_parameters()
                  if n.rpartition(".")[0] in fr.frozen_now() and not torch.equal(p, before[n])]
    return moved


def test_zero_grad_without_set_to_none_moves_frozen_weights_without_the_gates_reset(monkeypatch):
    """What the gates' grad reset prevents, measured: with a plain detach gate, zero grads left by
    zero_grad(set_to_none=False) make SGD momentum + weight decay move every frozen factor."""
    import lrd_fx.freezing as fz
    gm = gated()
    fr = gm.lrd.freezer
    opt = OPTIMIZERS["sgd_momentum_wd"](gm.parameters())

    def step():
        opt.zero_grad(set_to_none=False)
        nn.functional.cross_entropy(gm(X), Y).backward()
        opt.step()
    monkeypatch.setattr(fz, "_reset_frozen_grad", False)
    moved = _frozen_that_moved(step, gm, fr)
    assert {e for e, _ in moved} == {1, 2} and len(moved) >= 8       # every frozen factor, after epoch 0
    monkeypatch.setattr(fz, "_reset_frozen_grad", True)
    assert _frozen_that_moved(step, gm, fr) == []


def test_compiled_gates_keep_frozen_weights_with_zero_grad_set_to_none_false():
    import torch._dynamo as dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    gm = gated()
    fr = gm.lrd.freezer
    dynamo.reset()
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(gm, backend=cnt)
    opt = OPTIMIZERS["adamw"](gm.parameters())
    frames = []

    def step():
        opt.zero_grad(set_to_none=False)
        nn.functional.cross_entropy(compiled(X), Y).backward()
        opt.step()
        frames.append(cnt.frame_count)
    assert _frozen_that_moved(step, gm, fr, epochs=4) == []
    # the reset costs a recompilation the first time a state meets zero grads, never one per epoch
    assert frames[-1] == frames[-4] <= 4, frames
    dynamo.reset()


def _lrd_imports(path: Path) -> set[str]:
    """Every lrd_fx module a source file imports, at module level or inside functions, as absolute names."""
    package = ".".join(("lrd_fx",) + path.relative_to(Path(lrd_fx.__file__).parent).parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            mod = (base + "." + node.module if node.module else base) if node.level else node.module
            out |= {mod} | {f"{mod}.{a.name}" for a in node.names}
    return {m for m in out if m == "lrd_fx" or m.startswith("lrd_fx.")}


def test_freezing_does_not_import_the_passes():
    # issue 11: strip_gates lived in freezing.py and imported passes/freeze.py, which imports freezing.py
    import lrd_fx.freezing
    imports = _lrd_imports(Path(lrd_fx.freezing.__file__))
    assert "lrd_fx.errors" in imports                      # the walk sees the module's own imports
    assert not [m for m in imports if m.startswith("lrd_fx.passes")], imports
    assert "lrd_fx.freezing" in _lrd_imports(Path(lrd_fx.__file__).parent / "passes" / "gates.py")


def test_trainer_callback_sets_the_epoch_from_the_trainers_state():
    """transformers' Trainer calls on_train_begin, then on_epoch_begin with state.epoch = the epochs done (a
    fraction when resumed mid-epoch); the callback sets the gates' epoch from it."""
    tf = pytest.importorskip("transformers")
    gm = gated()
    fr = gm.lrd.freezer
    cb = fr.trainer_callback()
    assert isinstance(cb, tf.TrainerCallback)
    state, control = tf.TrainerState(), tf.TrainerControl()
    state.epoch = 0
    cb.on_train_begin(None, state, control)
    assert fr.epoch == 0 and fr.phase == 0
    seen = []
    for epoch in range(3):                # the Trainer's loop: the epoch's begin, then its steps
        cb.on_epoch_begin(None, state, control)
        seen.append((fr.epoch, tuple(fr.frozen_now())))
        for step in range(4):
            state.epoch = epoch + (step + 1) / 4
    assert [e for e, _ in seen] == [0, 1, 2] and seen[0][1] != seen[1][1] and seen[0][1] == seen[2][1]
    state.epoch = 1.5                     # resumed from a checkpoint saved mid-epoch 1
    cb.on_train_begin(None, state, control)
    assert fr.epoch == 1
