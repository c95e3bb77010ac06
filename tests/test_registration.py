"""torch.library registration and backend selection (pygen/_backend.py, pygen/ops/_registry.py)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import pygen
from pygen.ops._schemas import SCHEMAS
from pygen.ops._registry import TRITON_OPS


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_matches_python_list(name):
    """csrc/bindings.cpp and pygen/ops/_schemas.py declare the same schemas."""
    op = getattr(torch.ops.pygen, name).default
    assert str(op._schema) == "pygen::" + SCHEMAS[name]


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_op_has_fake_and_compiled_kernels(name):
    qual = f"pygen::{name}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qual, "Meta")
    if pygen.backends()["cpu"] == "available":
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qual, "CPU")
    if name in TRITON_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(TRITON_OPS[name], "Meta")


def test_backends_report():
    table = pygen.backends()
    assert set(table) == {"cuda", "triton", "cpu", "torch"}
    assert table["torch"] == "available"
    for name, status in table.items():
        assert isinstance(status, str) and status, name
    if not torch.cuda.is_available():
        assert table["cuda"] != "available"


def test_use_backend_and_env(monkeypatch):
    from pygen import _backend

    cpu = torch.device("cpu")
    expected_default = "cpu" if pygen.backends()["cpu"] == "available" else "torch"
    monkeypatch.delenv("PYGEN_BACKEND", raising=False)
    assert _backend.resolve(cpu) == expected_default
    with pygen.use_backend("torch"):
        assert _backend.resolve(cpu) == "torch"
        with pygen.use_backend(expected_default):
            assert _backend.resolve(cpu) == expected_default
        assert _backend.resolve(cpu) == "torch"
    monkeypatch.setenv("PYGEN_BACKEND", "torch")
    assert _backend.resolve(cpu) == "torch"
    monkeypatch.setenv("PYGEN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend"):
        _backend.resolve(cpu)
    monkeypatch.delenv("PYGEN_BACKEND")
    with pytest.raises(ValueError, match="backend"):
        with pygen.use_backend("fastest"):
            pass


@pytest.mark.parametrize("value", [None, "", "torch", "cpu", "a value with spaces é"])
def test_env_value_matches_os_environ(monkeypatch, value):
    """The per-call environment read (_backend.env_value) sees every os.environ change."""
    from pygen import _backend

    for name in ("PYGEN_BACKEND", "PYGEN_ATTENTION"):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
        assert _backend.env_value(name) == (os.environ.get(name) or None)
        os.environ[name] = "changed"
        assert _backend.env_value(name) == "changed"
        del os.environ[name]
        assert _backend.env_value(name) is None
    with pygen.use_backend("cuda"):
        with pytest.raises(ValueError, match="cuda"):
            pygen.randn(4, 1)


def test_default_backend_results_match_reference():
    with pygen.use_backend("torch"):
        ref = pygen.randn((3, 7), 5, 2)
    torch.testing.assert_close(pygen.randn((3, 7), 5, 2), ref, rtol=1e-6, atol=1e-6)


def _run_without_extension(code):
    env = dict(os.environ, PYGEN_DISABLE_EXTENSION="1", PYGEN_BACKEND="")
    env.pop("PYGEN_BACKEND")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=300)


def test_import_without_extension_falls_back_to_reference():
    """A missing compiled extension is never an import error; ops run on the reference."""
    res = _run_without_extension(
        """
        import torch, pygen
        b = pygen.backends()
        assert b["cpu"] != "available" and "PYGEN_DISABLE_EXTENSION" in b["cpu"], b
        assert b["cuda"] != "available", b
        z = pygen.randn((2, 5), 3)
        assert z.shape == (2, 5) and torch.isfinite(z).all()
        # the schemas exist and torch.ops.pygen runs the torch reference
        out = torch.empty(2, 5)
        torch.ops.pygen.randn_fill_(out, 3, 0, None)
        assert torch.equal(out, z)
        lv = torch.linspace(0.99, 0.1, 6, dtype=torch.float64)
        t = torch.ops.pygen.step_coefficients(lv, 0, 0, 0.0, 0.0, 0.0)
        assert t.shape == (5, 8)
        print("OK", sorted(b.items()))
        """
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "OK" in res.stdout


def _cpp_autograd_cases():
    """(op name, output requiring grad) for each compiled op whose autograd is C++ (csrc/autograd/)."""
    g = torch.Generator().manual_seed(5)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).requires_grad_()

    x, c = leaf(2, 3, 8), leaf(2, 8)
    q = leaf(1, 2, 5, 32)
    ops = torch.ops.pygen
    return [
        ("adaln_modulate", ops.adaln_modulate(x, None, None, c, c, 1e-6)[0]),
        ("gated_residual", ops.gated_residual(x, c, x)),
        ("group_norm", ops.group_norm(leaf(2, 4, 3, 3), leaf(4), leaf(4), 2, 1e-5, True)[0]),
        ("timestep_embedding", ops.timestep_embedding(leaf(3), 8, 10000.0, 1.0, 1.0, False)),
        ("attention_fwd", ops.attention_fwd(q, q, q, 0.25, False)[0]),
        ("diffusion_loss", ops.diffusion_loss(x, x.detach(), None, torch.ones(2, 4), 1, 0, None)),
        ("reparameterize_kl", ops.reparameterize_kl(x, x, None, 1, 0, None)[0]),
    ]


def test_compiled_autograd_is_cpp():
    """The compiled ops of csrc/autograd/ differentiate in C++: their grad_fn is a C++ node (no
    Python in the backward), and a backward through it runs."""
    if pygen.backends()["cpu"] != "available":
        pytest.skip("needs the compiled CPU backend")
    for name, out in _cpp_autograd_cases():
        node = out.grad_fn
        assert not isinstance(node, torch.autograd.function.BackwardCFunction), name
        assert "CppNode<pygen::autograd::" in node.name(), (name, node.name())
        out.float().sum().backward()


def test_call_compiled_below_autograd_matches_the_op():
    """call_compiled(op, False, ...) skips the Python autograd wrapper, same values; with grad=True
    the output carries the op's autograd."""
    if pygen.backends()["cpu"] != "available":
        pytest.skip("needs the compiled CPU backend")
    from pygen.ops._common import call_compiled

    x0 = torch.randn(3, 5)
    t = torch.tensor([0, 4, 9])
    table = torch.linspace(0.99, 0.01, 10)
    op = torch.ops.pygen.q_sample.default
    args = (x0, t, table, None, 11, 3, None, 0, 0)
    for a, b in zip(call_compiled(op, False, *args), op(*args)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    x0g = x0.clone().requires_grad_()
    x_t = call_compiled(op, True, x0g, *args[1:])[0]
    (g,) = torch.autograd.grad(x_t.sum(), x0g)
    torch.testing.assert_close(g, table[t].sqrt()[:, None].expand(3, 5))
