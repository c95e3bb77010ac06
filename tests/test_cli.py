"""Tests of the ``pygen`` command line (pygen/cli.py) and the benchmark runner (pygen/bench.py).

``pygen bench`` runs here on tiny sizes so the whole file takes seconds; the
numbers are not checked for speed, only for structure and sanity.
"""
import json
import math
import os
import time

import pytest
import torch

import pygen
from pygen import bench, cli

TINY = ["--sizes", "1024", "--repeats", "3", "--warmup", "1", "--min-time", "0.0005", "--max-time", "0.05"]


def _run_quick(tmp_path, capsys, *extra):
    path = tmp_path / "not" / "yet" / "there" / "out.json"  # missing directories are created
    rc = cli.main(["bench", "--quick", "--json", str(path), *TINY, *extra])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    with open(path) as f:
        return json.load(f), captured


def test_bench_quick_writes_table_and_json(tmp_path, capsys):
    report, captured = _run_quick(tmp_path, capsys, "--no-progress")
    out = captured.out

    header = next(line for line in out.splitlines() if line.startswith("op "))
    for col in ("op", "shape", "dtype", "backend", "time (µs)", "GB/s", "speedup vs eager"):
        assert col in header

    env = report["environment"]
    assert env["device"]["type"] == "cpu"
    assert env["device"]["name"] and env["device"]["cpu_count"] == os.cpu_count()
    assert set(env["versions"]) >= {"torch", "triton", "pygen", "python"}
    assert env["versions"]["pygen"] == pygen.__version__
    assert env["date"][:4].isdigit()
    assert env["backends"] == pygen.backends()
    assert report["settings"]["quick"] is True and report["settings"]["sizes"] == [1024]

    rows = report["results"]
    assert rows
    for r in rows:
        assert r["numel"] == 1024 and r["dtype"] == "fp32"
        assert math.prod(int(s) for s in r["shape"].split("x")) == 1024
        for key in ("time_us", "time_us_min", "gbps", "speedup_vs_eager", "bytes", "iterations", "repeats"):
            assert r[key] > 0, (key, r)
        assert math.isfinite(r["time_us"]) and r["time_us_min"] <= r["time_us"]
        assert r["gbps"] == pytest.approx(r["bytes"] / (r["time_us"] * 1e-6) / 1e9)
        assert r["op"] in out and r["shape"] in out

    # every op is either timed or reported as skipped with a reason; eager always runs
    ops = {r["op"] for r in rows}
    assert ops == set(bench.OPS)
    for op in bench.OPS:
        eager = [r for r in rows if r["op"] == op and r["backend"] == "eager"]
        assert len(eager) == 1 and eager[0]["speedup_vs_eager"] == pytest.approx(1.0)
    for s in report["skipped"]:
        assert s["op"] in bench.OPS and s["reason"]
    # randn exists on every build: at least one pygen backend is timed, with a speedup measured against eager
    randn = [r for r in rows if r["op"] == "randn" and r["backend"] != "eager"]
    assert randn and all(r["backend"] in bench.PYGEN_BACKENDS for r in randn)
    eager_randn = next(r for r in rows if r["op"] == "randn" and r["backend"] == "eager")
    for r in randn:
        assert r["speedup_vs_eager"] == pytest.approx(eager_randn["time_us"] / r["time_us"])
    # triton is never timed on CPU tensors (interpreter only)
    assert not any(r["backend"] == "triton" for r in rows)
    # the copy baseline gives every row its fraction of copy bandwidth
    assert all(r["copy_fraction"] > 0 for r in rows)
    assert "JSON: " + str(tmp_path / "not" / "yet" / "there" / "out.json") in out


def test_bench_progress_and_markdown(tmp_path, capsys):
    md = tmp_path / "md" / "report.md"
    report, captured = _run_quick(tmp_path, capsys, "--ops", "randn,copy", "--markdown", str(md))
    assert {r["op"] for r in report["results"]} == {"randn", "copy"}
    # progress on stderr (a counter, as stderr is not a terminal here)
    assert "[1/2]" in captured.err and "done" in captured.err
    text = md.read_text()
    assert text.startswith("# pygen bench — CPU")
    assert "| op | shape | dtype | backend | time (µs) |" in text
    assert text.count("\n| randn |") == len([r for r in report["results"] if r["op"] == "randn"])


def test_bench_family_and_dtype_selection(tmp_path, capsys):
    report, _ = _run_quick(tmp_path, capsys, "--no-progress", "--ops", "q_sample", "--dtypes", "bf16,fp16")
    assert {r["op"] for r in report["results"]} == {"q_sample", "q_sample+rng"}
    assert {r["dtype"] for r in report["results"]} == {"bf16", "fp16"}


def test_bench_no_json(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = cli.main(["bench", "--quick", "--no-json", "--no-progress", "--ops", "copy", *TINY])
    assert rc == 0
    assert "JSON:" not in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [
    ["--ops", "no_such_op"],
    ["--dtypes", "fp8"],
    ["--sizes", "abc"],
    ["--sizes", "0"],
    ["--backends", "gpu"],
])
def test_bench_bad_arguments(argv, capsys):
    assert cli.main(["bench", "--no-json", *argv]) == 2
    assert "pygen bench:" in capsys.readouterr().err


def test_bench_cuda_without_device(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert cli.main(["bench", "--device", "cuda", "--no-json"]) == 2
    assert "CUDA" in capsys.readouterr().err


def test_default_json_path(tmp_path, monkeypatch):
    env = {"device": {"type": "cpu", "name": "x"}, "date": "2026-11-23T01:02:03+00:00"}
    # not in a checkout: a file in the cwd
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "checkout_root", lambda: None)
    assert cli.default_json_path(env) == str(tmp_path / "pygen-bench-cpu-2026-11-23.json")
    # in a checkout: benchmarks/results/ (created when written)
    monkeypatch.setattr(cli, "checkout_root", lambda: str(tmp_path))
    assert cli.default_json_path(env) == str(tmp_path / "benchmarks" / "results" / "bench-cpu-2026-11-23.json")
    env_gpu = {"device": {"type": "cuda", "name": "NVIDIA H100 80GB HBM3"}, "date": "2026-11-23"}
    assert cli.default_json_path(env_gpu).endswith("bench-cuda-nvidia-h100-80gb-hbm3-2026-11-23.json")
    assert cli.default_json_path(env, quick=True).endswith("bench-cpu-2026-11-23-quick.json")


def test_checkout_detection(tmp_path, monkeypatch):
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "pygen"\n')
    assert cli._is_checkout(str(tmp_path))
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")
    assert cli.checkout_root() == str(tmp_path)
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "other"\n')
    assert not cli._is_checkout(str(tmp_path))


def test_write_falls_back_when_path_unwritable(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    written = cli._write_text(str(blocker / "sub" / "out.json"), "{}", "JSON")  # parent is a file
    assert written == str(tmp_path / "out.json")
    assert (tmp_path / "out.json").read_text() == "{}"
    assert "cannot write JSON" in capsys.readouterr().err


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"pygen {pygen.__version__}")
    assert "torch" in out and torch.__version__ in out
    for name, status in pygen.backends().items():
        assert f"{name}" in out and status in out


def test_info_json(capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backends"] == pygen.backends()
    assert info["versions"]["torch"] == torch.__version__
    assert info["cpu"]["count"] == os.cpu_count()


def test_no_subcommand_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2


# ---------------------------------------------------------------------------
# pygen/bench.py
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("text,value", [("1024", 1024), ("2^22", 1 << 22), ("2**10", 1024), ("4M", 4 << 20),
                                        ("64k", 65536)])
def test_parse_size(text, value):
    assert bench.parse_size(text) == value


def test_parse_size_rejects_garbage():
    with pytest.raises(ValueError, match="size"):
        bench.parse_size("2^x")


def test_select_ops_and_dtypes():
    assert bench.select_ops(None) == list(bench.OPS)
    assert bench.select_ops(["langevin_step+rng", "copy"]) == ["langevin_step+rng", "copy"]
    assert bench.select_ops(["ddim_step"]) == ["ddim_step", "ddim_step+rng"]
    assert bench.select_dtypes(["bf16", "float16"]) == [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("numel", [1, 3, 1024, 1000, 1 << 22, 6 * 7 * 11])
def test_shape_for(numel):
    shape = bench.shape_for(numel)
    assert math.prod(shape) == numel and len(shape) == 2 and shape[0] >= 1


def test_measure_times_what_it_runs():
    calls = {"slow": 0, "fast": 0}

    def slow():
        calls["slow"] += 1
        time.sleep(0.002)

    def fast():
        calls["fast"] += 1

    impls = [bench.Impl("eager", slow), bench.Impl("torch", fast)]
    t = bench.measure(impls, "cpu", warmup=1, repeats=3, min_time=0.004, max_time=1.0)
    assert 0.002 <= t["eager"].median_s < 0.2
    assert t["torch"].median_s < t["eager"].median_s
    assert t["eager"].repeats == 3 and t["eager"].iterations >= 2
    assert t["eager"].min_s <= t["eager"].median_s
    # warmup + calibration + 3 timed batches
    assert calls["slow"] >= 1 + 3 * t["eager"].iterations


def test_missing_api_is_skipped_not_fatal(monkeypatch):
    monkeypatch.delattr(pygen, "randn")
    case = bench.build_case("randn", 1024, torch.float32, "cpu")
    assert [i.backend for i in case.impls] == ["eager"]
    runnable, _ = bench.pygen_backends_for(torch.device("cpu"))
    assert runnable
    for backend in runnable:
        assert case.skipped[backend] == "pygen.randn is not implemented on this build"


def test_failing_backend_is_skipped_with_reason():
    def broken():
        raise NotImplementedError("no kernel yet")

    case = bench.Case("randn", (4, 256), torch.float32, torch.device("cpu"),
                      [bench.Impl("eager", lambda: None), bench.Impl("torch", broken)], {})
    rows = bench.run_case(case, warmup=1, repeats=3, min_time=1e-4, max_time=0.01)
    assert [r["backend"] for r in rows] == ["eager"]
    assert "not implemented on this build (NotImplementedError: no kernel yet)" == case.skipped["torch"]


_GIVEN_NOISE_OPS = ["q_sample", "reparameterize", "langevin_step", "ddim_step"]


@pytest.mark.parametrize("op", _GIVEN_NOISE_OPS)
def test_eager_twin_computes_the_same_math(op):
    """The benchmark compares like with like: with the noise given, pygen == the eager composite."""
    case = bench.build_case(op, 3 * 1000, torch.float32, "cpu")
    pygen_impls = [i for i in case.impls if i.backend != "eager"]
    if not pygen_impls:
        pytest.skip(f"{op}: {sorted(set(case.skipped.values()))}")
    bench.probe(case)
    expected = case.impls[0].fn()
    for impl in case.impls[1:]:
        with impl.context():
            got = impl.fn()
        got = got[0] if isinstance(got, tuple) else got
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"{op} on {impl.backend}")


@pytest.mark.parametrize("op", [op for op in bench.OPS if op.endswith("+rng")] + ["randn"])
def test_rng_variants_produce_outputs_of_the_case_shape(op):
    case = bench.build_case(op, 2 * 512, torch.float16, "cpu")
    bench.probe(case)
    for impl in case.impls:
        with impl.context():
            got = impl.fn()
        got = got[0] if isinstance(got, tuple) else got
        assert got.shape == case.shape and got.dtype == torch.float16, impl.backend
        assert torch.isfinite(got.float()).all()


def test_each_impl_runs_on_its_backend():
    from pygen import _backend

    case = bench.build_case("randn", 1024, torch.float32, "cpu")
    assert case.impls[0].backend == "eager"
    assert len(case.impls) > 1
    for impl in case.impls[1:]:
        with impl.context():
            assert _backend.resolve(case.device) == impl.backend
