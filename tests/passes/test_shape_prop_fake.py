"""shape_prop on fake tensors (big models): the same shapes, call counts, node metadata and FLOPs as the real
forward, no fake tensor left in the model, and the real forward whenever the fake one cannot run."""
import pytest
import torch
import torch.nn as nn

import lrd_fx
from lrd_fx.passes import shape_prop as sp
from lrd_fx.pipeline import graph_modules


def _tv(name, size=32):
    import torchvision
    return lambda: (getattr(torchvision.models, name)(num_classes=10), (torch.randn(2, 3, size, size),))


def _timm_vit():
    import timm
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10), (torch.randn(2, 3, 32, 32),)


def _gpt2():
    import transformers as tf
    torch.manual_seed(0)
    m = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16))
    return m, (torch.randint(0, 64, (2, 8)),)


def _bert():
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=16)
    return tf.BertModel(cfg), (torch.randint(0, 64, (2, 8)),)


def _bert_masked():
    model, (ids,) = _bert()
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return model, {"input_ids": ids, "attention_mask": mask}


class Caches(nn.Module):
    """Keeps its last activation and a counter buffer it reassigns in forward (fake tensors must not stay)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.register_buffer("seen", torch.zeros(()))
        self.last = None

    def forward(self, x):
        h = self.fc1(x).relu()
        self.last = h
        self.seen = self.seen + 1
        return self.fc2(h)


class DataDependent(nn.Module):
    """Branches on a tensor's value: fake tensors cannot run it, the real forward can."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        h = self.fc1(x)
        if float(h.sum()) > 1e9:
            h = h * 0
        return self.fc2(h.relu())


def _meta(gm):
    out = {}
    for prefix, part in graph_modules(gm):
        for n in part.graph.nodes:
            tm = n.meta.get("tensor_meta")
            if hasattr(tm, "shape"):
                out[prefix + n.name] = (tuple(tm.shape), tm.dtype, n.meta.get("type"))
    return out


def _fakes(model):
    from torch._subclasses.fake_tensor import FakeTensor
    found = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if isinstance(t, FakeTensor)]
    for name, m in model.named_modules():
        found += [f"{name}.{k}" for k, v in vars(m).items() if isinstance(v, FakeTensor)]
    return found


MODELS = [_tv("resnet18"), _tv("mobilenet_v3_small"), _tv("densenet121"), _timm_vit, _gpt2, _bert, _bert_masked,
          lambda: (Caches(), (torch.randn(4, 16),))]


@pytest.mark.parametrize("make", MODELS, ids=["resnet18", "mobilenet_v3_small", "densenet121", "vit", "gpt2",
                                              "bert", "bert-mask-kwargs", "caches"])
def test_fake_forward_records_what_the_real_one_does(monkeypatch, make):
    model, x = make()
    model.eval()
    calls = []
    real_fake = sp.capture_fake
    monkeypatch.setattr(sp, "capture_fake", lambda *a, **k: calls.append(1) or real_fake(*a, **k))
    monkeypatch.setattr(sp, "FAKE_MIN_BYTES", 1 << 60)
    ref = lrd_fx.compile(model, x, ratio=0.5, progress=False, cache=False)
    assert calls == []
    monkeypatch.setattr(sp, "FAKE_MIN_BYTES", 0)
    monkeypatch.setattr(sp, "capture_shapes", _no_real_forward(sp.capture_shapes))
    gm = lrd_fx.compile(model, x, ratio=0.5, progress=False, cache=False)
    assert calls == [1]
    assert gm.lrd.flops_before == ref.lrd.flops_before and gm.lrd.flops_after == ref.lrd.flops_after
    assert {k: (r.in_shape, r.out_shape, r.ranks) for k, r in gm.lrd.records().items()} == \
        {k: (r.in_shape, r.out_shape, r.ranks) for k, r in ref.lrd.records().items()}
    assert _meta(gm) == _meta(ref)
    assert _meta(gm) or not any(isinstance(m, torch.fx.GraphModule) for m in gm.modules())
    assert _fakes(gm) == [] and _fakes(model) == []
    with torch.no_grad():
        run = (lambda m: m(**x)) if isinstance(x, dict) else (lambda m: m(*x))
        torch.testing.assert_close(_first(run(gm)), _first(run(ref)))


def _first(out):
    if isinstance(out, torch.Tensor):
        return out
    return out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state if hasattr(out, "last_hidden_state") \
        else out.logits


def _no_real_forward(real):
    def capture(root, args, kwargs, *, fake=False, counter=None):
        assert fake, "the model ran on real tensors"
        return real(root, args, kwargs, fake=fake, counter=counter)
    return capture


@pytest.mark.parametrize("fake", [True, False])
def test_state_a_forward_assigns_is_kept_and_left_alone(monkeypatch, fake):
    # fx cannot record `self.x = ...`: Caches stays eager (its buffer update runs), and neither tracing (no
    # Proxy) nor shape_prop's forward (no fake or example tensor, no count) leaves anything in the model
    monkeypatch.setattr(sp, "FAKE_MIN_BYTES", 0 if fake else 1 << 60)
    model = Caches()
    gm = lrd_fx.compile(model, (torch.randn(4, 16),), ratio=0.5, progress=False)
    assert not isinstance(gm, torch.fx.GraphModule) and "seen" in dict(gm.named_buffers())
    assert gm.last is None and float(gm.seen) == 0.0 and _fakes(gm) == []
    assert "forward assigns self.last, self.seen" in gm.lrd.report()
    x = torch.randn(4, 16)
    assert gm(x).shape == (4, 16) and float(gm.seen) == 1.0 and gm.last.shape == (4, 32)
    assert model.last is None and float(model.seen) == 0.0


def test_the_real_forward_runs_where_the_fake_one_cannot(monkeypatch):
    monkeypatch.setattr(sp, "FAKE_MIN_BYTES", 0)
    real = []
    capture = sp.capture_shapes
    monkeypatch.setattr(sp, "capture_shapes", lambda *a, **k: (real.append(k.get("fake", False)), capture(*a, **k))[1])
    x = torch.randn(4, 16)
    model = DataDependent()
    gm = lrd_fx.compile(model, (x,), ratio=0.5, progress=False)
    assert real[0] is True and real[-1] is False          # fake first, then the real forward
    assert any("forward on fake tensors failed" in n and "ran the real one" in n for n in gm.lrd.notes)
    assert gm.lrd.flops_before and all(r.in_shape for r in gm.lrd.records().values())
    torch.testing.assert_close(gm(x), model(x), rtol=0.5, atol=0.5)
    # inputs that do not fit still end in the InputError of the eager model
    with pytest.raises(lrd_fx.InputError, match=r"shape \[\(4, 15\)\]"):
        lrd_fx.compile(Caches(), (torch.randn(4, 15),), ratio=0.5, progress=False)


def test_only_big_models_run_on_fake_tensors():
    assert not sp.fake_pays(nn.Linear(256, 256))
    big = nn.Linear(8, 8)
    big.weight = nn.Parameter(torch.empty(0))   # counted by bytes, not by modules
    assert not sp.fake_pays(big)
    with torch.device("meta"):
        huge = nn.Linear(1 << 13, 1 << 13)       # 256 MiB of float32
    assert sp.fake_pays(huge)
