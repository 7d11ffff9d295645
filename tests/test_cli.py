"""`lrd-fx` console command."""
import pytest

from lrd_fx.cli import main


def test_compile_prints_report(capsys):
    assert main(["compile", "resnet18", "--ratio", "0.25", "--input", "1x3x32x32"]) == 0
    out = capsys.readouterr().out
    assert "layer1.0.conv1" in out and "decomposed" in out and "params in factorized layers" in out


def test_compile_debug_prints_graphs(capsys):
    assert main(["compile", "resnet18", "--input", "1x3x32x32", "--debug", "--factorized-only"]) == 0
    assert "graph after pass 'decompose'" in capsys.readouterr().out


@pytest.mark.parametrize("scheme", ["conv_svd", "svd"])
def test_conv_scheme_conv_svd(capsys, scheme):
    # 3x3 convs become kxk -> 1x1 chains: the report names the scheme each layer got
    assert main(["compile", "resnet18", "--input", "1x3x32x32", "--conv-scheme", scheme]) == 0
    out = capsys.readouterr().out
    assert "conv_svd" in out and "tucker2" not in out


def test_decompose_grouped_factorizes_resnext_grouped_convs(capsys):
    argv = ["compile", "resnext50_32x4d", "--input", "1x3x32x32", "--ratio", "0.5"]
    assert main(argv) == 0
    assert "decompose_grouped=False" in capsys.readouterr().out
    assert main(argv + ["--decompose-grouped"]) == 0
    out = capsys.readouterr().out
    assert "decompose_grouped=False" not in out
    row = next(line for line in out.splitlines() if line.startswith("layer4.0.conv2 "))
    assert "decomposed" in row


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["compile", "no_such_model_xyz"]) == 2
    assert "unknown model 'no_such_model_xyz'" in capsys.readouterr().err


def test_bad_input_flag(capsys):
    with pytest.raises(SystemExit):
        main(["compile", "resnet18", "--input", "1xAx3"])
    assert "NxCxHxW" in capsys.readouterr().err


def test_cache_info_and_clear(tmp_path, monkeypatch, capsys):
    import torch

    from lrd_fx.cost.cache import TimingCache, make_key
    from lrd_fx.cost.timer import Measurement
    path = tmp_path / "timings.sqlite"
    monkeypatch.setenv("LRD_FX_CACHE", str(path))
    with TimingCache(path) as c:
        c.put_many((make_key(device=torch.device("cpu"), dtype=torch.float32, memory_format="contiguous",
                             signature="Conv2d|8x8x3x3", input_shape=(1, 8, 4, 4), rank=str(r),
                             objective="infer"), Measurement(1e-3, 0.0, 3)) for r in (2, 3, 4))
    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert f"path: {path}" in out and "entries: 3" in out
    assert main(["cache", "clear", "--path", str(path)]) == 0
    assert "3 entries removed" in capsys.readouterr().out
    assert main(["cache", "info", "--path", str(path)]) == 0
    assert "entries: 0" in capsys.readouterr().out


def test_compile_with_freeze_period_and_save(tmp_path, capsys):
    import torch

    import lrd_fx
    from lrd_fx.models import create_model
    out = tmp_path / "r18.pt"
    assert main(["compile", "resnet18", "--input", "1x3x32x32", "--freeze", "sequential", "--freeze-period", "3",
                 "--factorized-only", "--save", str(out)]) == 0
    assert "decomposed" in capsys.readouterr().out
    gm = lrd_fx.load(create_model("resnet18"), out)
    fr = gm.lrd.freezer
    assert fr is not None and fr.schedule.period == 3
    assert gm.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def test_cache_info_on_odd_paths_changes_nothing(tmp_path, capsys):
    d = tmp_path / "somedir"
    d.mkdir()
    assert main(["cache", "info", "--path", str(d)]) == 2
    err = capsys.readouterr().err
    assert "CacheError" in err and str(d) in err and "not an lrd_fx timing cache" in err and "cache=False" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["somedir"]           # not renamed, nothing created
    missing = tmp_path / "new" / "timings.sqlite"
    assert main(["cache", "info", "--path", str(missing)]) == 0
    assert "entries: 0" in capsys.readouterr().out and not (tmp_path / "new").exists()
    assert main(["cache", "clear", "--path", str(missing)]) == 0
    assert "0 entries removed" in capsys.readouterr().out and not (tmp_path / "new").exists()


def test_no_guard_keeps_the_factors(capsys):
    """--rank-search runs the whole-model guard, which gives layers back when the whole model is slower;
    --no-guard keeps every factor and the report says the model is not faster."""
    from lrd_fx.cost.timer import use_fake_clock
    from lrd_fx.factorize import FactorChain

    def clock(info):     # every factor looks faster alone, but each one slows the whole model by 10%
        if info.label == "lrd":
            return 1e-3 * (1 + 0.1 * sum(isinstance(m, FactorChain) for m in info.module.modules()))
        return 1e-4 if isinstance(info.module, FactorChain) else 1e-3
    argv = ["compile", "resnet18", "--input", "1x3x32x32", "--rank-search", "infer"]
    with use_fake_clock(clock):
        assert main(argv + ["--no-guard"]) == 0
        kept = capsys.readouterr().out
        assert main(argv) == 0
        guarded = capsys.readouterr().out
    assert "NOT faster than the original" in kept and "whole-model guard" not in kept
    assert "whole-model guard: the decomposed model was 0.33x" in guarded and "all 20 were given back" in guarded


def _trained_resnet18(num_classes=10):
    import torch
    import torchvision
    torch.manual_seed(1)
    return torchvision.models.resnet18(num_classes=num_classes).eval()


@pytest.mark.parametrize("form", ["safetensors", "checkpoint"])
def test_weights_file_is_the_model_compiled(tmp_path, capsys, form):
    # at rank="full" the saved factors reproduce the weights the file gave: a fresh random model loaded
    # from the saved file computes what the trained model computes
    import torch
    import torchvision

    import lrd_fx
    trained = _trained_resnet18()
    sd = trained.state_dict()
    if form == "safetensors":      # named .bin: found by its header
        from safetensors.torch import save_file
        weights = tmp_path / "w.bin"
        save_file(sd, str(weights))
    else:   # a training script's checkpoint of a DDP-wrapped model
        weights = tmp_path / "ckpt.pt"
        torch.save({"epoch": 3, "model": {"module." + k: v for k, v in sd.items()}}, weights)
    out = tmp_path / "out.lrd"
    assert main(["compile", "resnet18", "--weights", str(weights), "--num-classes", "10", "--rank", "full",
                 "--input", "2x3x32x32", "--save", str(out)]) == 0
    assert f"weights {weights}" in capsys.readouterr().out
    fresh = torchvision.models.resnet18(num_classes=10).eval()
    loaded = lrd_fx.load(fresh, str(out)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want, got, other = trained(x), loaded(x), fresh(x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(other, want, rtol=1e-2, atol=1e-2)


def test_skip_keeps_the_named_layers(capsys):
    assert main(["compile", "resnet18", "--input", "1x3x32x32", "--skip", "fc", "--skip", "layer4.*"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line[:1].isalpha()}
    assert "decomposed" in rows["layer3.0.conv1"]
    assert "skipped" in rows["fc"] and "skipped" in rows["layer4.0.conv1"]


def test_weights_of_another_head_say_num_classes(tmp_path, capsys):
    from safetensors.torch import save_file
    weights = tmp_path / "w.safetensors"
    save_file(_trained_resnet18(10).state_dict(), str(weights))
    assert main(["compile", "resnet18", "--weights", str(weights), "--input", "1x3x32x32"]) == 2
    err = capsys.readouterr().err
    assert "LoadError" in err and "fc.weight is [10, 512] in the file, [1000, 512] in the model" in err
    assert "--num-classes" in err


def test_weights_that_are_not_a_state_dict_or_missing(tmp_path, capsys):
    import torch
    assert main(["compile", "resnet18", "--weights", str(tmp_path / "none.pt")]) == 2
    assert "no such file" in capsys.readouterr().err
    odd = tmp_path / "odd.pt"
    torch.save({"epoch": 3, "lr": 0.1}, odd)
    assert main(["compile", "resnet18", "--weights", str(odd)]) == 2
    assert "not a state_dict" in capsys.readouterr().err
    sd = _trained_resnet18(1000).state_dict()
    for name, edit, words in (("bool", lambda t: t != 0, "torch.bool in the file but torch.float32"),
                              ("sparse", lambda t: t.to_sparse(), "sparse tensor")):
        bad = tmp_path / f"{name}.pt"
        torch.save({**sd, "fc.weight": edit(sd["fc.weight"])}, bad)
        assert main(["compile", "resnet18", "--weights", str(bad), "--input", "1x3x32x32"]) == 2
        assert words in capsys.readouterr().err


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_weights_file_cannot_run_code(tmp_path, capsys):
    # a pickle that would create a file when unpickled: refused, and nothing ran
    import torch
    marker = tmp_path / "ran"
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _RunsCode(str(marker))}, bad)
    assert main(["compile", "resnet18", "--weights", str(bad), "--input", "1x3x32x32"]) == 2
    err = capsys.readouterr().err
    assert "LoadError" in err and "runs code" in err
    assert not marker.exists()


def test_channels_last_amp_budget_and_fuse_flags_reach_compile(monkeypatch, capsys):
    import torch

    import lrd_fx
    seen = {}
    real = lrd_fx.compile

    def spy(model, inputs, **kw):
        seen.update(kw, cl=inputs[0].is_contiguous(memory_format=torch.channels_last),
                    model_cl=model.conv1.weight.is_contiguous(memory_format=torch.channels_last))
        kw.pop("rank_search", None), kw.pop("rank_budget", None), kw.pop("amp", None)
        return real(model, inputs, **kw)

    monkeypatch.setattr(lrd_fx, "compile", spy)
    assert main(["compile", "resnet18", "--input", "1x3x32x32", "--channels-last", "--fuse-inference",
                 "--amp", "bf16", "--rank-search", "infer", "--rank-budget", "0.3"]) == 0
    assert "channels_last" in capsys.readouterr().out
    assert seen["cl"] and seen["model_cl"] and seen["fuse_inference"] is True
    assert seen["amp"] == "bf16" and seen["rank_budget"] == 0.3 and seen["rank_search"] == "infer"
    assert main(["compile", "resnet18", "--input", "1x32", "--channels-last"]) == 2
    assert "4-D input" in capsys.readouterr().err


def test_python_dash_m_runs_the_command():
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "lrd_fx", "cache", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "info" in r.stdout
