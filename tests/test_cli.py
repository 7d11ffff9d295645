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


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["compile", "no_such_model_xyz"]) == 2
    assert "unknown model 'no_such_model_xyz'" in capsys.readouterr().err


def test_bad_input_flag(capsys):
    with pytest.raises(SystemExit):
        main(["compile", "resnet18", "--input", "1xAx3"])
    assert "NxCxHxW" in capsys.readouterr().err
