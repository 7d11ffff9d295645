"""Pending factor chains and the materialize pass: exact before they are factorized, factorized once."""
import copy

import pytest
import torch
import torch.nn as nn

import lrd_fx
from lrd_fx.config import Config
from lrd_fx.context import CompileContext
from lrd_fx.cost.timer import use_cost_fn
from lrd_fx.factorize import FactorChain, materialize_, modules as fm, paused, pending_chain, pending_chains
from lrd_fx.passes.materialize import materialize

LAYERS = {
    "linear": (lambda: nn.Linear(24, 20), (3, 24), "svd", (6,)),
    "conv1x1": (lambda: nn.Conv2d(16, 12, 1, stride=2), (2, 16, 6, 6), "tucker2", (5,)),
    "conv_svd": (lambda: nn.Conv2d(8, 12, 3, padding=1), (2, 8, 6, 6), "conv_svd", (5,)),
    "tucker2": (lambda: nn.Conv2d(8, 12, 3, padding=1, bias=False), (2, 8, 6, 6), "tucker2", (4, 6)),
}


class Counter:
    """Counts fm.factorize calls (factorize_many runs its jobs through it), by layer name and ranks."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = fm.factorize

        def counting(module, ranks, scheme="tucker2", *, name="", **kw):
            self.calls.append((name, tuple(ranks) if isinstance(ranks, (list, tuple)) else (ranks,)))
            return real(module, ranks, scheme, name=name, **kw)
        monkeypatch.setattr(fm, "factorize", counting)


def run_children(chain, x):
    """Call the factors one by one, as the compiled graph does (it never calls the container)."""
    for role in chain.roles():
        x = getattr(chain, role)(x)
    return x


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_pending_chain_is_exact_on_first_forward(kind, monkeypatch):
    make, shape, scheme, ranks = LAYERS[kind]
    torch.manual_seed(0)
    layer, x = make(), torch.randn(*shape)
    full = fm.full_ranks(layer, scheme)
    count = Counter(monkeypatch)
    chain = pending_chain(layer, full, scheme, name="layer")
    assert isinstance(chain, FactorChain) and chain.pending is not None and "pending" in repr(chain)
    assert count.calls == []                                            # nothing factorized yet
    with torch.no_grad():
        torch.testing.assert_close(run_children(chain, x), layer(x), rtol=1e-4, atol=1e-5)
    assert count.calls == [("layer", tuple(full))] and chain.pending is None
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in chain.modules())   # hooks removed
    assert {"_pending", "_handles", "_paused", "_stash"}.isdisjoint(vars(chain))         # no state left
    # below full rank: the factorization at the chain's ranks, the same as factorizing directly
    low = pending_chain(layer, ranks, scheme, name="low")
    with torch.no_grad():
        torch.testing.assert_close(low(x), fm.factorize(layer, ranks, scheme)(x))


def test_reading_weight_materializes_and_fill_keeps_the_parameters():
    layer = nn.Linear(16, 12)
    chain = pending_chain(layer, (16 - 4,), "svd")
    params = [id(p) for p in chain.parameters()]
    torch.testing.assert_close(chain.bias, layer.bias)        # the bias is the source's from the start
    w = chain.weight                                          # a graph reading .weight gets the product
    assert chain.pending is None and w.shape == layer.weight.shape
    assert [id(p) for p in chain.parameters()] == params      # filled in place: same Parameter objects


def test_paused_chain_runs_its_source_and_stays_pending(monkeypatch):
    torch.manual_seed(0)
    conv, x = nn.Conv2d(8, 12, 3, padding=1), torch.randn(2, 8, 6, 6)
    count = Counter(monkeypatch)
    chain = pending_chain(conv, (3, 4), "tucker2", name="c")     # far below full rank
    with paused(chain), torch.no_grad():
        torch.testing.assert_close(run_children(chain, x), conv(x))   # the original layer's output
        assert chain.weight is conv.weight
    assert count.calls == [] and chain.pending is not None
    with torch.no_grad():
        torch.testing.assert_close(chain(x), fm.factorize(conv, (3, 4), "tucker2")(x))
    assert [n for n, _ in count.calls] == ["c", ""] and chain.pending is None


def test_deepcopy_of_a_pending_chain_materializes_on_its_own():
    conv, x = nn.Conv2d(8, 12, 3, padding=1), torch.randn(2, 8, 6, 6)
    chain = pending_chain(conv, (4, 6), "tucker2")
    twin = copy.deepcopy(chain)
    with torch.no_grad():
        twin(x)
    assert twin.pending is None and chain.pending is not None     # the copy's hooks act on the copy
    with torch.no_grad():
        torch.testing.assert_close(chain(x), twin(x))


def test_materialize_pass_fills_every_pending_chain_in_one_call(monkeypatch):
    torch.manual_seed(0)
    layers = [nn.Linear(32, 32), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(32, 16)]
    root = nn.ModuleDict({"a": pending_chain(layers[0], (8,), "svd", name="a"),
                          "b": pending_chain(layers[1], (4, 4), "tucker2", name="b"),
                          "c": pending_chain(layers[2], (8,), "svd", name="c")})
    root["c"].materialize_()                                      # already filled: not asked again
    batches = []
    real = fm.factorize_many

    def counting(jobs, **kw):
        batches.append([j[0] for j in jobs])
        return real(jobs, **kw)
    monkeypatch.setattr(fm, "factorize_many", counting)
    p = materialize(CompileContext(config=Config(progress=False), model=nn.Identity()))
    assert p.name == "materialize" and p.requires == ("decompose",)
    result = p(root)
    assert result.modified and batches == [["a", "b"]] and pending_chains(root) == []
    torch.testing.assert_close(root["a"].weight, fm.factorize(layers[0], (8,), "svd").weight)
    again = p(root)                                               # nothing pending: a no-op
    assert not again.modified and batches == [["a", "b"]]
    assert materialize_(root) == 0


def cost_keeping_the_estimate(module, shape, mode):
    """Fake timings: every chain beats the original and the estimate is the fastest rank."""
    if isinstance(module, FactorChain):
        first = module.first
        r = first.out_features if isinstance(first, nn.Linear) else first.out_channels
        return 1.0 + abs(r - 8) * 0.1
    return 10.0


def convnet():
    return nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 4 * 4, 32))


def test_nothing_pending_after_compile_with_rank_search(monkeypatch):
    torch.manual_seed(0)
    model, x = convnet().eval(), torch.randn(2, 16, 4, 4)
    count = Counter(monkeypatch)
    with use_cost_fn(cost_keeping_the_estimate):
        gm = lrd_fx.compile(model, (x,), rank=8, rank_search="infer", whole_model_check=False, progress=False,
                            cache=False)
    plan = gm.lrd.plan
    kept = [n for n, r in plan.items() if r["decision"] == "searched"]
    assert kept == ["0", "2", "5"] and pending_chains(gm) == []
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in gm.modules())   # plain modules again
    assert sorted(n for n, _ in count.calls) == kept              # each kept layer factorized exactly once
    assert "materialize" in gm.lrd.pass_times
    ref = lrd_fx.compile(model, (x,), rank=8, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), ref(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(copy.deepcopy(gm)(x), gm(x))


@pytest.mark.parametrize("mode", ["sequential", "oneshot"])
def test_nothing_pending_after_compile_with_calibration(mode, monkeypatch):
    """Every chain is filled once: fitted to the data, or (no statistics for it: string padding under
    the SVD scheme) its plain factorization, never a random placeholder."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding="same"),
                          nn.ReLU(), nn.Conv2d(16, 16, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    calib = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    count = Counter(monkeypatch)
    gm = lrd_fx.compile(model, (x,), ratio=0.5, conv_scheme="svd", min_channels=3, calibration=calib,
                        calibration_mode=mode, progress=False)
    assert pending_chains(gm) == []
    assert sorted(n for n, _ in count.calls) == ["0", "2", "4"]   # once each
    plan = gm.lrd.plan
    assert "data-aware" in plan["0"]["reason"] and "data-aware" in plan["4"]["reason"]
    assert "data-aware" not in plan["2"]["reason"]
    assert "saw no calibration data and keep the plain weight factorization: 2" in gm.lrd.report()
    plain = fm.factorize(model[2], tuple(plan["2"]["ranks"]), "conv_svd")
    torch.testing.assert_close(gm.get_submodule("2").first.weight, plain.first.weight)
    torch.testing.assert_close(gm.get_submodule("2").last.weight, plain.last.weight)
