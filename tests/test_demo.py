"""Tests of ``pygen demo`` (pygen/demo.py and its subcommand in pygen/cli.py).

The demo runs in-process at tiny sizes (n = 256, a few steps) on the torch and cpu backends; one
test runs ``python -m pygen.cli demo --quick`` end to end in a subprocess. Timings are not
checked for speed, only for structure; the distances are checked to separate a good sampler
from a bad one.
"""
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import pygen
from pygen import cli, demo
from test_plot import decode_png

# 20 steps: pc_sample's Langevin corrector needs a VP SDE with N >= 20 (alpha = 1 - beta_max/N >= 0)
TINY = dict(n=256, steps=20, repeats=1, seed=0)


def _backends():
    out = ["torch"]
    if pygen.backends()["cpu"] == "available":
        out.append("cpu")
    return out


def _expected_nfe(name, steps):
    """NFE of the samplers whose count is fixed by their definition (None: not checked here)."""
    return {
        "pc": 2 * steps, "em": steps, "ode_heun": 2 * steps, "ode_euler": steps, "ula": steps, "mala": steps + 1,
        "hmc": steps * demo.HMC_LEAPFROG + 1, "pt": steps + 1, "ald": steps + 1,  # ald: + the final Tweedie denoise
        "dpmpp_2m": steps, "euler": steps, "euler_ancestral": steps, "dpmpp_2m_sde": steps,
        "heun": 2 * steps - 1, "lms": steps,
    }.get(name)


@pytest.mark.parametrize("backend", _backends())
def test_demo_runs_every_sampler(backend, tmp_path):
    names = list(demo.samplers())
    out, js = tmp_path / "sub" / "demo.png", tmp_path / "demo.json"
    lines = []

    class Sink:
        def write(self, s):
            lines.append(s)

        def flush(self):
            pass

    with pygen.use_backend(backend):
        report = demo.run_demo(names, out=out, json_path=js, file=Sink(), **TINY)
    text = "".join(lines)
    rows = report["rows"]
    assert [r["sampler"] for r in rows] == names
    assert report["environment"]["backend"] == backend
    for r in rows:
        assert r["backend"] == backend
        assert r["steps"] == 20
        exp = _expected_nfe(r["sampler"], r["steps"])
        assert r["nfe"] >= r["steps"] and (exp is None or r["nfe"] == exp), (r["sampler"], r["nfe"], exp)
        for key in ("time_ms", "torch_ms", "speedup", "sw", "mode_err"):
            assert math.isfinite(r[key]) and r[key] >= 0, (r["sampler"], key, r[key])
        assert r["time_ms"] > 0 and r["speedup"] == pytest.approx(r["torch_ms"] / r["time_ms"])
        if backend == "torch":
            assert r["speedup"] == 1.0  # the reference is the best backend itself: not timed twice
        assert r["non_finite"] == 0 and r["verdict"] in ("ok", "off (SW)", "off (modes)", "off (SW, modes)")
        # one table line per sampler, with its numbers
        line = next(ln for ln in text.splitlines() if ln.split()[:1] == [r["sampler"]])
        assert line.split()[1:3] == [str(r["steps"]), str(r["nfe"])]
        assert f"{r['sw']:.4f}" in line and f"{r['speedup']:.2f}x" in line
    th = report["thresholds"]
    assert 0 < th["sw"] < 1 and 0 < th["mode_err"] < 1
    header = next(ln for ln in text.splitlines() if ln.startswith("sampler"))
    for col in ("steps", "NFE", "time (ms)", "speedup", "SW dist", "SW thr", "mode err"):
        assert col in header
    # the PNG: the exact panel plus one per sampler, 4 per row, at 240 px
    assert report["png"] == str(out.resolve()) and f"PNG: {out.resolve()}" in text
    img = decode_png(out)
    k = len(names) + 1
    cols, rows_ = min(4, k), -(-k // 4)
    assert img.shape == (rows_ * (240 + 13) + (rows_ - 1) * 2, cols * 240 + (cols - 1) * 2, 3)
    from pygen import plot
    assert (img == torch.tensor(plot.DOT, dtype=torch.uint8).numpy()).all(-1).sum() > 100
    saved = json.loads(js.read_text())
    assert saved["schema"] == "pygen-demo/1" and [r["sampler"] for r in saved["rows"]] == names
    assert saved["settings"]["n"] == 256 and saved["png"] == report["png"]


def test_distances_separate_good_from_bad_samplers(tmp_path):
    """The verdict can go both ways: an accurate sampler is within the calibrated thresholds, two
    steps of HMC from a broad start are not."""
    good = "dpmpp_2m" if "dpmpp_2m" in demo.samplers() else "ode_heun"
    with pygen.use_backend("torch"):
        rep = demo.run_demo([good], n=1024, repeats=1, out=None, file=open(os.devnull, "w"))
        bad = demo.run_demo(["hmc"], n=1024, steps=2, repeats=1, out=None, file=open(os.devnull, "w"))
    assert rep["rows"][0]["verdict"] == "ok", rep["rows"][0]
    assert bad["rows"][0]["verdict"] == "off (SW, modes)", bad["rows"][0]
    assert bad["rows"][0]["sw"] > 1.3 * bad["thresholds"]["sw"]
    assert bad["rows"][0]["mode_err"] > 2 * bad["thresholds"]["mode_err"]


def test_non_finite_samples_fail_and_are_counted(tmp_path, monkeypatch, capsys):
    def broken(mixture, n, steps, seed, device):
        x = pygen.randn((n, 2), seed, device=device)
        x[:7] = float("nan")
        return x, steps, steps

    reg = dict(demo.samplers())
    reg["broken"] = demo.Sampler("broken", "emits NaN", 5, 2, broken)
    monkeypatch.setattr(demo, "samplers", lambda: reg)
    rep = demo.run_demo(["broken"], out=tmp_path / "b.png", **TINY)
    r = rep["rows"][0]
    assert r["non_finite"] == 7 and r["verdict"] == "FAIL (7 non-finite)" and math.isnan(r["sw"])
    assert rep["png_skipped_non_finite"] == 7
    out = capsys.readouterr().out
    assert "warning: broken produced 7 non-finite samples" in out and "7 non-finite samples not drawn" in out


def test_bad_arguments_raise_before_running(tmp_path):
    out = tmp_path / "never.png"
    with pytest.raises(ValueError, match=r"unknown sampler\(s\) 'nope'; valid: .*pc.*hmc"):
        demo.run_demo(["pc", "nope"], out=out)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        demo.run_demo(["pc"], steps=0, out=out)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        demo.run_demo(["pc"], steps=-3, out=out)
    with pytest.raises(ValueError, match="n must be an int >= 2"):
        demo.run_demo(["pc"], n=1, out=out)
    with pytest.raises(ValueError, match="target must be one of clot, ring"):
        demo.run_demo(["pc"], target="moon", out=out)
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        demo.run_demo(["pc"], device="meta", out=out)
    with pytest.raises(ValueError, match="must not repeat"):
        demo.run_demo("pc,pc", out=out)
    with pytest.raises(ValueError, match="at least one sampler"):
        demo.run_demo(" , ", out=out)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            demo.run_demo(["pc"], device="cuda", out=out)
    assert not out.exists()


def test_samplers_without_kdiffusion(monkeypatch):
    monkeypatch.setattr(demo, "_kdiffusion", lambda: (None, "pygen.kdiffusion is not importable (test)"))
    reg = demo.samplers()
    assert not set(reg) & set(demo.KDIFFUSION_SAMPLERS)
    assert demo.default_samplers(reg) == list(demo.FALLBACK)
    with pytest.raises(ValueError, match=r"dpmpp_2m: pygen.kdiffusion is not importable \(test\)"):
        demo.run_demo(["dpmpp_2m"], out=None)


def test_default_samplers_and_registry():
    reg = demo.samplers()
    for s in reg.values():
        assert isinstance(s, demo.Sampler) and s.default_steps >= 1 and s.quick_steps >= 1 and callable(s.run)
    defaults = demo.default_samplers(reg)
    assert 4 <= len(defaults) <= 6 and all(name in reg for name in defaults)
    try:
        import pygen.kdiffusion  # noqa: F401
    except ImportError:
        assert defaults == list(demo.FALLBACK)
    else:
        assert defaults == list(demo.PREFERRED)
        assert {"euler", "heun", "dpmpp_2m", "dpmpp_2m_sde", "euler_ancestral"} <= set(reg)
    assert dataclasses.is_dataclass(demo.Sampler)


def test_threads_restored_and_ring_target(tmp_path):
    before = torch.get_num_threads()
    rep = demo.run_demo(["ode_heun"], target="ring", threads=1, out=None, file=open(os.devnull, "w"), **TINY)
    assert torch.get_num_threads() == before
    assert rep["settings"]["target"] == "ring" and rep["environment"]["torch_threads"] == 1


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------
def test_cli_demo_in_process(tmp_path, capsys):
    out, js = tmp_path / "c.png", tmp_path / "c.json"
    rc = cli.main(["demo", "--quick", "--n", "256", "--steps", "2", "--samplers", "ode_heun,hmc",
                   "--out", str(out), "--json", str(js), "--no-progress"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert cap.err == ""
    assert [r["sampler"] for r in json.loads(js.read_text())["rows"]] == ["ode_heun", "hmc"]
    assert decode_png(out).shape[2] == 3
    assert "ode_heun" in cap.out and "hmc" in cap.out and f"PNG: {out.resolve()}" in cap.out


def test_cli_demo_progress_on_stderr(tmp_path, capsys):
    rc = cli.main(["demo", "--n", "256", "--steps", "2", "--samplers", "ode_heun", "--repeats", "1", "--no-png"])
    cap = capsys.readouterr()
    assert rc == 0 and "ode_heun: warm-up on" in cap.err and "PNG:" not in cap.out


def test_cli_demo_errors(capsys):
    assert cli.main(["demo", "--samplers", "pc,bogus", "--no-png"]) == 2
    err = capsys.readouterr().err
    assert "unknown sampler(s) 'bogus'; valid:" in err and "ode_heun" in err
    for argv in (["demo", "--steps", "0"], ["demo", "--n", "x"], ["demo", "--target", "moon"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --steps: must be >= 1, got 0" in err and "argument --target: invalid choice" in err


def test_python_m_pygen_cli_demo_end_to_end(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(pygen.__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "pygen.cli", "demo", "--quick", "--n", "256", "--steps", "2",
                           "--samplers", "pc,ode_heun", "--no-progress"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    png = tmp_path / "pygen-demo.png"  # the default output path, in the current directory
    assert decode_png(png).shape[2] == 3
    assert f"PNG: {png}" in proc.stdout
    assert any(line.startswith("pc ") for line in proc.stdout.splitlines())
