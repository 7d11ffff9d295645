"""recalibrate_bn: re-estimated BatchNorm statistics, restored modes, accuracy back on a toy case."""
import pytest
import torch
import torch.nn as nn

from lrd_fx.bn import recalibrate_bn
from lrd_fx.errors import ConfigError, InputError


class ModeProbe(nn.Module):
    """Records the training flag it saw on each call."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(self.training)
        return x


def net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), ModeProbe(),
                         nn.Dropout(0.5), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))


def test_stats_become_the_batch_average_and_modes_are_restored():
    model = net().train()
    bn = model[1]
    bn.momentum = 0.3
    with torch.no_grad():
        bn.running_mean.fill_(5.0)
        bn.running_var.fill_(100.0)
    batches = [torch.randn(4, 3, 6, 6) * 2 + 1 for _ in range(3)]
    w = model[0].weight.detach().clone()
    out = recalibrate_bn(model, batches)
    assert out is model                                      # in place, returned for chaining
    with torch.no_grad():
        acts = [model[0](b) for b in batches]
    expect_mean = torch.stack([a.mean((0, 2, 3)) for a in acts]).mean(0)
    expect_var = torch.stack([a.var((0, 2, 3), unbiased=True) for a in acts]).mean(0)
    torch.testing.assert_close(bn.running_mean, expect_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, expect_var, rtol=1e-4, atol=1e-5)
    assert bn.num_batches_tracked.item() == 3
    assert model.training and all(m.training for m in model.modules())   # train mode restored
    assert bn.momentum == 0.3                                             # momentum restored
    assert model[3].seen == [False, False, False]          # dropout & co. ran in eval mode
    assert torch.equal(model[0].weight, w)                  # weights untouched
    model.eval()
    recalibrate_bn(model, batches)
    assert not model.training and not bn.training


def test_accepts_tuples_dicts_and_max_batches():
    model = net().eval()
    data = [(torch.randn(4, 3, 6, 6), torch.zeros(4)) for _ in range(5)]
    recalibrate_bn(model, iter(data), max_batches=2)
    assert model[1].num_batches_tracked.item() == 2

    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = net()

        def forward(self, *, pixels):
            return self.body(pixels)

    kw = KW()
    recalibrate_bn(kw, [{"pixels": torch.randn(2, 3, 6, 6)}])
    assert kw.body[1].num_batches_tracked.item() == 1


def test_momentum_keeps_old_stats_as_start():
    model = net()
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.fill_(5.0)
    recalibrate_bn(model, [torch.randn(4, 3, 6, 6)], momentum=0.5)
    assert (bn.running_mean > 2.0).all() and (bn.running_mean < 3.0).all()   # halfway from 5 to ~0
    assert bn.momentum == 0.1


def test_errors_leave_the_stats_untouched():
    model = net()
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.fill_(5.0)
    with pytest.raises(InputError, match="no batch"):
        recalibrate_bn(model, [])
    with pytest.raises(InputError, match="tensor, an \\(x, y\\) tuple"):
        recalibrate_bn(model, [torch.randn(2, 3, 6, 6), "oops"])
    assert (bn.running_mean == 5.0).all() and model.training
    with pytest.raises(ConfigError, match="momentum"):
        recalibrate_bn(model, [torch.randn(2, 3, 6, 6)], momentum=2.0)
    plain = nn.Linear(3, 3)
    assert recalibrate_bn(plain, []) is plain                # no BatchNorm: nothing to do


def test_wrong_stats_recalibrated_restore_accuracy():
    torch.manual_seed(0)
    n = 256
    y = torch.randint(0, 2, (n,))
    x = torch.randn(n, 3, 6, 6) + (y.float() * 2 - 1).view(-1, 1, 1, 1) * 0.8
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(40):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    recalibrate_bn(model, x.split(32))

    def acc():
        model.eval()
        with torch.no_grad():
            out = model(x)
        model.train()
        return (out.argmax(1) == y).float().mean().item(), out

    good, ref = acc()
    assert good > 0.9
    with torch.no_grad():                                   # what a decomposition does to the stats
        model[1].running_mean.add_(20.0)               # ReLU after it now zeroes every channel
        model[1].running_var.mul_(0.01)
    bad, _ = acc()
    assert bad < 0.75
    recalibrate_bn(model, x.split(32))
    back, out = acc()
    assert back == good
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
