"""tools/op_smoke.py (the compute-sanitizer driver for GPU sessions) runs every op group and catches a wrong op."""
import importlib.util
import os

import pytest

import pygen

_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tools", "op_smoke.py")


def _load():
    if not os.path.isfile(_PATH):
        pytest.skip("tools/op_smoke.py is not in this tree")
    spec = importlib.util.spec_from_file_location("op_smoke", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_every_group_passes_on_cpu(backend, capsys):
    if backend == "cpu" and pygen.backends()["cpu"] != "available":
        pytest.skip("compiled CPU backend unavailable")
    assert _load().main(["--device", "cpu", "--backend", backend, "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "7/7 groups ok" in out


def test_a_wrong_op_is_reported(monkeypatch, capsys):
    smoke = _load()
    real = pygen.attention

    calls = []

    def wrong(q, k, v, *args, **kwargs):  # 1.5x off (the reference pass uses attention_reference)
        calls.append(1)
        out = real(q, k, v, *args, **kwargs)
        return out * 1.5

    monkeypatch.setattr(pygen, "attention", wrong)
    assert smoke.main(["--device", "cpu", "--backend", "torch", "--dtype", "float32", "--only", "attention"]) == 1
    assert "attention: FAILED" in capsys.readouterr().out
    assert len(calls) == 3  # the tested pass only
