"""Gradient checkpointing survives compile: a forward that calls torch.utils.checkpoint stays eager (a graph
would run the checkpointed code inline and drop the checkpoint), and an nn.Sequential under an eager module
stays an nn.Sequential its parent can iterate (timm's checkpoint_seq)."""
import sys

import pytest
import timm
import torch
import torch.nn as nn
import torch.utils.checkpoint

import lrd_fx
from conftest import ResidualMLP as Block
from lrd_fx import trace as lt
from lrd_fx.factorize import FactorChain

ckpt = torch.utils.checkpoint.checkpoint     # bound once, as `from torch.utils.checkpoint import checkpoint` does


class CheckpointedNet(nn.Module):
    """Checkpoints each block in training, the way timm's and Hugging Face's models do."""

    def __init__(self, reentrant: bool = False, bound: bool = False):
        super().__init__()
        self.stem = nn.Linear(16, 32)
        self.blocks = nn.Sequential(Block(32), Block(32), Block(32))
        self.head = nn.Linear(32, 10)
        self.reentrant, self.bound = reentrant, bound

    def forward(self, x):
        x = self.stem(x)
        fn = ckpt if self.bound else torch.utils.checkpoint.checkpoint
        for blk in self.blocks:                   # iterates the Sequential
            x = fn(blk, x, use_reentrant=self.reentrant)
        return self.head(x)


def _count_checkpoint_calls(monkeypatch, model, x) -> int:
    calls = []
    real = torch.utils.checkpoint.checkpoint

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    monkeypatch.setattr(sys.modules[__name__], "ckpt", counting)
    model(x).sum().backward()
    return len(calls)


@pytest.mark.parametrize("reentrant, bound", [(False, False), (True, False), (False, True)])
def test_checkpointed_forward_stays_eager_and_still_checkpoints(monkeypatch, reentrant, bound):
    torch.manual_seed(0)
    model = CheckpointedNet(reentrant, bound).train()
    x = torch.randn(4, 16, requires_grad=reentrant)
    gm = lrd_fx.compile(model, (x,), rank="full", progress=False)
    reason = gm.lrd.fallback_parts["<root>"]
    assert "CheckpointInTrace" in reason and "gradient checkpointing" in reason
    # the blocks are still an nn.Sequential (the root iterates it), each block traced and factorized
    assert isinstance(gm.blocks, nn.Sequential) and len(gm.blocks) == 3
    assert all(isinstance(b, torch.fx.GraphModule) for b in gm.blocks)
    assert isinstance(gm.blocks[0].fc1, FactorChain) and isinstance(gm.stem, FactorChain)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    assert _count_checkpoint_calls(monkeypatch, gm, x) == 3
    assert all(p.grad is not None for n, p in gm.named_parameters() if "blocks" in n)


def test_refused_entries_are_restored_after_compile_and_after_a_failed_trace():
    import random

    import numpy as np
    import torch.utils.checkpoint as c
    entries = lt._refused_entries()
    assert any(owner is c for owner, *_ in entries), "torch.utils.checkpoint has none of the entries watched"
    before = [(owner, name, getattr(owner, name), name in vars(owner)) for owner, name, *_ in entries]
    lrd_fx.compile(CheckpointedNet().train(), (torch.randn(2, 16),), ratio=0.5, progress=False)
    with pytest.raises(lrd_fx.LRDError):
        lrd_fx.compile(CheckpointedNet().train(), (torch.randn(2, 16),), ratio=0.5, fallback=False,
                       progress=False)
    assert [(o, n, getattr(o, n), n in vars(o)) for o, n, *_ in entries] == before
    assert "random" not in vars(random.Random)           # inherited again, not left as an attribute
    # outside tracing a checkpoint runs and random numbers are drawn as usual
    y = c.checkpoint(lambda t: t * 2, torch.ones(2, requires_grad=True), use_reentrant=False)
    assert torch.equal(y, torch.full((2,), 2.0))
    assert 0 <= random.uniform(0, 1) <= 1 and 0 <= np.random.random() < 1


class LayerDrop(nn.Module):
    """LayerDrop decided with Python or NumPy random numbers (Hugging Face wav2vec2's adapter, MusicGen)."""

    def __init__(self, use_numpy):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(16, 16) for _ in range(4)])
        self.use_numpy = use_numpy

    def forward(self, x):
        import random

        import numpy as np
        for layer in self.layers:
            draw = {"numpy": np.random.random, "uniform": lambda: random.uniform(0, 1), "random": random.random}
            p = draw[self.use_numpy]()
            if not self.training or p > 0.5:
                x = layer(x)
        return x


@pytest.mark.parametrize("use_numpy", ["numpy", "uniform", "random"])
def test_python_random_numbers_in_forward_keep_the_module_eager(use_numpy):
    import random

    import numpy as np
    torch.manual_seed(0)
    model = LayerDrop(use_numpy).train()
    x = torch.randn(2, 16)
    gm = lrd_fx.compile(model, (x,), rank="full", progress=False)
    reason = gm.lrd.fallback_parts["<root>"]
    assert reason.startswith("RandomInTrace: draws Python or NumPy random numbers")
    assert "test_checkpointing.py" in reason                  # the user's line, not random.py's
    assert all(isinstance(layer, FactorChain) for layer in gm.layers)
    # the ModuleList under the eager root has no forward: walked into, not reported as a failed trace
    assert list(gm.lrd.fallback_parts) == ["<root>"] and isinstance(gm.layers, nn.ModuleList)
    assert all(gm.lrd.plan[f"layers.{i}"]["fallback"] == "<root>" for i in range(4))
    random.seed(0), np.random.seed(0)
    got = [gm(x) for _ in range(6)]
    random.seed(0), np.random.seed(0)
    want = [model(x) for _ in range(6)]
    for g, w in zip(got, want):                              # the same layers dropped, call by call
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert len({round(float(g.sum()), 4) for g in got}) > 1  # and not the same decision every call


import numpy as np  # noqa: E402

_GLOBAL_RNG = np.random.default_rng(7)


class GeneratorDrop(nn.Module):
    """LayerDrop decided by a NumPy generator object: held by the module (a Generator or a legacy
    RandomState), a module-level global, or made inside forward. Its draws go through a C type that
    cannot be patched, so tracing them is caught by the generator's state."""

    def __init__(self, source):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(16, 16) for _ in range(4)])
        self.source = source
        if source == "generator":
            self.rng = np.random.default_rng(0)
        elif source == "random_state":
            self.rng = np.random.RandomState(0)

    def forward(self, x):
        for layer in self.layers:
            if self.source == "global":
                p = _GLOBAL_RNG.random()
            elif self.source == "made_in_forward":
                p = np.random.default_rng().random()
            else:
                p = self.rng.random_sample() if self.source == "random_state" else self.rng.random()
            if not self.training or p > 0.5:
                x = layer(x)
        return x


class Outer(nn.Module):
    def __init__(self, source):
        super().__init__()
        self.stem = nn.Linear(16, 16)
        self.drop = GeneratorDrop(source)

    def forward(self, x):
        return self.drop(self.stem(x).relu())


@pytest.mark.parametrize("source", ["generator", "random_state", "global"])
def test_numpy_generator_draws_keep_the_drawing_module_eager(source):
    torch.manual_seed(0)
    model = Outer(source).train()
    x = torch.randn(2, 16)
    gm = lrd_fx.compile(model, (x,), rank="full", progress=False)
    reason = gm.lrd.fallback_parts["drop"]
    assert reason.startswith("RandomInTrace: draws Python or NumPy random numbers"), reason
    assert "NumPy generator" in reason and ("global _GLOBAL_RNG" if source == "global" else "self.rng") in reason
    assert reason.endswith("test_checkpointing.py:" f"{GeneratorDrop.forward.__code__.co_firstlineno} in "
                           "GeneratorDrop.forward)"), reason               # where it draws, not lrd_fx's line
    assert isinstance(gm.stem, FactorChain) and all(isinstance(layer, FactorChain) for layer in gm.drop.layers)
    # the compiled model draws on every call, as the original does: the same numbers from the same state
    if source == "global":
        get, put = (lambda m: _GLOBAL_RNG.bit_generator.state), (lambda m, st: setattr(_GLOBAL_RNG.bit_generator,
                                                                                      "state", st))
    elif source == "random_state":
        assert gm.drop.rng is not model.drop.rng                 # the caller's generator is not shared
        get, put = (lambda m: m.drop.rng.get_state()), (lambda m, st: m.drop.rng.set_state(st))
    else:
        assert gm.drop.rng is not model.drop.rng
        get, put = (lambda m: m.drop.rng.bit_generator.state), (lambda m, st: setattr(m.drop.rng.bit_generator,
                                                                                     "state", st))
    state = get(gm)
    got = [gm(x) for _ in range(6)]
    put(model, state)
    want = [model(x) for _ in range(6)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert len({round(float(g.sum()), 4) for g in got}) > 1  # and not the same decision every call


@pytest.mark.parametrize("kind", ["generator", "random_state", "bit_generator"])
def test_tracing_puts_numpy_generators_back_as_they_were(kind):
    """numpy_draws_watched names what was drawn from and restores its state: tracing uses up no numbers."""
    make = {"generator": lambda: np.random.default_rng(3), "random_state": lambda: np.random.RandomState(3),
            "bit_generator": lambda: np.random.PCG64(3)}[kind]
    draw = {"generator": lambda g: g.random(), "random_state": lambda g: g.random_sample(),
            "bit_generator": lambda g: g.random_raw()}[kind]
    model = Outer("generator")
    model.drop.rng = make()
    expected = draw(make())                                      # the first number of a fresh generator
    drew: list = []
    with lt.numpy_draws_watched(model, drew):
        draw(model.drop.rng), draw(model.drop.rng)
    assert drew == [("drop", "self.rng")]
    assert draw(model.drop.rng) == expected
    drew.clear()
    with lt.numpy_draws_watched(model, drew):
        pass
    assert drew == []


def test_numpy_generator_made_in_forward_is_refused_while_tracing():
    own = np.random.default_rng
    model = Outer("made_in_forward").train()
    gm = lrd_fx.compile(model, (torch.randn(2, 16),), rank="full", progress=False)
    assert gm.lrd.fallback_parts["drop"].startswith("RandomInTrace"), gm.lrd.fallback_parts
    assert np.random.default_rng is own                         # numpy's own function again after compile


def test_numpy_draws_in_train_mode_only_keep_the_module_eager():
    """Traced in eval mode the forward draws nothing; its train-mode trace draws, so the module stays eager
    (one graph cannot do both), with the generator named in the reason."""

    class TrainSkip(GeneratorDrop):
        def forward(self, x):
            for layer in self.layers:
                if self.training and self.rng.random() < 0.5:
                    continue
                x = layer(x)
            return x

    model = Outer("generator").eval()
    model.drop = TrainSkip("generator").eval()
    x = torch.randn(2, 16)
    gm = lrd_fx.compile(model, (x,), rank="full", progress=False)
    reason = gm.lrd.fallback_parts["drop"]
    assert reason.startswith("forward traces in eval mode only") and "RandomInTrace" in reason, reason
    gm.train(), model.train()
    state = gm.drop.rng.bit_generator.state
    got = gm(x)
    model.drop.rng.bit_generator.state = state
    torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)


def test_checkpointing_model_saves_and_loads_without_inputs(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = CheckpointedNet().train()
    x = torch.randn(4, 16)
    gm = lrd_fx.compile(model, (x,), ratio=0.5, freeze="sequential", progress=False)
    lrd_fx.save(gm, tmp_path / "m.safetensors")
    loaded = lrd_fx.load(model, tmp_path / "m.safetensors")
    assert isinstance(loaded.blocks, nn.Sequential)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), gm(x))
    assert _count_checkpoint_calls(monkeypatch, loaded, x) == 3


class IndexingNet(nn.Module):
    """An eager root (data-dependent branch) that indexes, slices and takes len() of its Sequential."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(Block(16), Block(16), Block(16), nn.Sequential(nn.Linear(16, 16)))

    def forward(self, x):
        for blk in self.blocks[: len(self.blocks) - 1]:
            x = blk(x)
        if x.sum() > -1e9:
            x = self.blocks[-1](x)
        return x


def test_sequential_under_an_eager_module_can_be_indexed_sliced_and_iterated():
    torch.manual_seed(0)
    model = IndexingNet().eval()
    x = torch.randn(3, 16)
    gm = lrd_fx.compile(model, (x,), rank="full", progress=False)
    assert type(gm.blocks) is nn.Sequential and type(gm.blocks[3]) is nn.Sequential
    assert isinstance(gm.blocks[3][0], FactorChain)       # a layer directly in a kept Sequential
    assert "blocks" not in gm.lrd.fallback_parts          # not a failure: only the root is reported
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    small = lrd_fx.compile(model, (x,), ratio=0.5, progress=False)
    assert small.lrd.report().count("decomposed") >= 6


def test_timm_model_with_grad_checkpointing_keeps_it(monkeypatch):
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=5)
    model.set_grad_checkpointing(True)
    model.train()
    x = torch.randn(2, 3, 32, 32)
    gm = lrd_fx.compile(model, (x,), rank="full", progress=False)
    assert "CheckpointInTrace" in gm.lrd.fallback_parts["<root>"]
    assert all(isinstance(getattr(gm, f"layer{i}"), nn.Sequential) for i in range(1, 5))
    assert _count_checkpoint_calls(monkeypatch, gm, x) == _count_checkpoint_calls(monkeypatch, model, x) > 0
    gm.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)


class CallCheckpointBlock(Block):
    """Checkpoints in __call__, as transformers 4's GradientCheckpointingLayer did."""

    def __call__(self, *args, **kwargs):
        if self.training:
            return torch.utils.checkpoint.checkpoint(super().__call__, *args, use_reentrant=False, **kwargs)
        return super().__call__(*args, **kwargs)


class GradGatedNet(nn.Module):
    """Checkpoints only while gradients are on (transformers 5's layers check torch.is_grad_enabled())."""

    def __init__(self, block=Block):
        super().__init__()
        self.layers = nn.ModuleList([block(16), block(16)])
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        for layer in self.layers:
            if self.training and torch.is_grad_enabled() and block_checkpoints(layer):
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return self.head(x)


def block_checkpoints(layer) -> bool:
    return not isinstance(layer, CallCheckpointBlock)     # that one checkpoints itself


@pytest.mark.parametrize("block, no_grad", [(CallCheckpointBlock, False), (Block, True)])
def test_checkpointing_in_call_or_only_with_grad_enabled_is_kept(monkeypatch, block, no_grad):
    torch.manual_seed(0)
    model = GradGatedNet(block).train()
    x = torch.randn(3, 16)
    with torch.no_grad() if no_grad else torch.enable_grad():        # compile itself under no_grad
        gm = lrd_fx.compile(model, (x,), rank="full", progress=False)
    if block is CallCheckpointBlock:
        assert "overrides __call__" in gm.lrd.fallback_parts["layers.0"]
        assert type(gm.layers[0]) is CallCheckpointBlock
    assert _count_checkpoint_calls(monkeypatch, gm, x) == _count_checkpoint_calls(monkeypatch, model, x) == 2
    with torch.no_grad():
        torch.testing.assert_close(gm.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-5)


class OwnForwardSequential(nn.Sequential):
    def forward(self, x):
        for layer in self:
            x = layer(x)
        return x


class SequentialCheckpointNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = OwnForwardSequential(Block(16), Block(16), Block(16))

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint_sequential(self.blocks, 2, x, use_reentrant=False)


def test_sequential_subclass_under_an_eager_module_stays_a_container(monkeypatch):
    torch.manual_seed(0)
    model = SequentialCheckpointNet().train()
    x = torch.randn(3, 16)
    gm = lrd_fx.compile(model, (x,), ratio=0.5, progress=False)
    assert type(gm.blocks) is OwnForwardSequential and len(gm.blocks) == 3
    assert isinstance(gm.blocks[0].fc1, FactorChain)
    assert _count_checkpoint_calls(monkeypatch, gm, x) == _count_checkpoint_calls(monkeypatch, model, x) > 0


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 16)

    def forward(self, x, bias=None):
        a = self.qkv(x)
        if bias is not None:          # traced apart, fx takes `bias` as given: this branch fails on None
            a = a + bias
        return a


class BiasBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.fc = Attn(), nn.Linear(16, 16)

    def forward(self, x, bias=None):
        return x + self.fc(self.attn(x, bias=bias))


class CheckpointedBlocksWithNone(nn.Module):
    """BEiT's pattern: every block checkpointed and called with rel_pos_bias=None."""

    def __init__(self, n):
        super().__init__()
        self.blocks = nn.ModuleList([BiasBlock() for _ in range(n)])

    def forward(self, x):
        for b in self.blocks:
            x = torch.utils.checkpoint.checkpoint(b, x, bias=None, use_reentrant=False)
        return x


def test_parts_of_the_same_class_are_kept_eager_together():
    torch.manual_seed(0)
    model = CheckpointedBlocksWithNone(12).train()      # one part kept eager per retrace would need 24 > 8
    x = torch.randn(2, 16)
    gm = lrd_fx.compile(model, (x,), rank="full", progress=False)
    kept = gm.lrd.kept_eager
    assert set(kept) == {f"blocks.{i}" for i in range(12)} | {f"blocks.{i}.attn" for i in range(12)}
    assert kept["blocks.5"].startswith("kept eager like 'blocks.0', a module of the same class")
    assert isinstance(gm.blocks[11].attn.qkv, FactorChain)
    with torch.no_grad():
        torch.testing.assert_close(gm.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-5)
