"""Call every pygen op once, forward and backward, at small odd sizes, on one backend.

For ``compute-sanitizer`` (memcheck / racecheck / initcheck on the CUDA and Triton kernels) on a
GPU machine; it checks results against the torch reference only loosely (finite where the reference
is finite, close at a generous tolerance) — the exact comparisons live in tests/. Runs on the CPU
too (``--device cpu --backend cpu``), which is how CI-less machines check the script itself.

    python tools/op_smoke.py --device cuda --backend cuda
    compute-sanitizer --tool memcheck --error-exitcode 1 python tools/op_smoke.py --device cuda --backend triton

Exit status 0 when every op ran and agreed; the failing op names are printed otherwise.
"""
import argparse
import sys
import traceback

import torch


def _ops(device, dtype, reference=False):
    """(name, fn) pairs; each fn returns a list of tensors to compare between backends."""
    import pygen

    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, dt=dtype, grad=False):
        x = torch.randn(*shape, generator=g).to(device=device, dtype=dt)
        return x.requires_grad_(grad)

    abar = torch.linspace(0.9999, 0.01, 1000, dtype=torch.float64, device=device)
    t = torch.tensor([3, 999, 500], device=device)

    def randn():
        return [pygen.randn((3, 5, 7), seed=5, stream=2, device=device)]

    def q_sample():
        x0 = rand(3, 5, 7, grad=True)
        xt = pygen.q_sample(x0, t, abar, seed=1, stream=3, target="v")
        out = xt[0] if isinstance(xt, tuple) else xt
        out.float().sum().backward()
        return [out, x0.grad]

    def reparameterize():
        mu, lv = rand(3, 1001, grad=True), rand(3, 1001, grad=True)
        z = pygen.reparameterize(mu, lv, seed=2)
        z.float().square().sum().backward()
        return [z, mu.grad, lv.grad]

    def langevin():
        x, s = rand(3, 5, 7), rand(3, 5, 7)
        a = pygen.langevin_step(x, s, 0.01, seed=4)
        b = pygen.langevin_snr_step(x, s, 0.04, seed=4)
        return [a, b[0] if isinstance(b, tuple) else b]

    def attention():
        # The reference pass takes the plain math reference, not SDPA: SDPA's cuDNN/flash kernels are
        # not ours to sanitize (racecheck flags hazards inside cuDNN's wgmma kernels).
        attend = pygen.attention_reference if reference else pygen.attention
        outs = []
        for d, causal, (sq, sk) in ((64, False, (33, 17)), (80, True, (7, 13)), (32, True, (65, 65))):
            q, k, v = (rand(2, 3, s, d, dt=dtype, grad=True) for s in (sq, sk, sk))
            o = attend(q, k, v, causal=causal)
            o.float().square().sum().backward()
            outs += [o, q.grad, k.grad, v.grad]
        return outs

    def norm():
        x, sh, sc, gate = rand(2, 5, 33, grad=True), rand(2, 33, grad=True), rand(2, 33, grad=True), rand(2, 33)
        y = pygen.adaln_modulate(x, sh, sc)
        r = pygen.gated_residual(x, gate, y)
        h = rand(2, 12, 5, 3, grad=True)
        w, b = rand(12, grad=True), rand(12, grad=True)
        gn = pygen.group_norm(h, 4, w, b, silu=True)
        hc = rand(2, 12, 5, 3).contiguous(memory_format=torch.channels_last).requires_grad_(True)
        gnc = pygen.group_norm(hc, 3, silu=False)
        tt = torch.tensor([0.5, 999.0], device=device, dtype=torch.float32, requires_grad=True)
        emb = pygen.timestep_embedding(tt, 33, flip_sin_to_cos=True)
        (r.float().sum() + gn.float().square().sum() + gnc.float().sum() + emb.sum()).backward()
        return [y, r, gn, gnc, emb, x.grad, sh.grad, sc.grad, h.grad, w.grad, b.grad, hc.grad, tt.grad]

    def losses():
        out, x0 = rand(3, 5, 7, grad=True), rand(3, 5, 7)
        coeffs = torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, -0.3, 0.9, 2.0], [0.5, 0.0, -1.0, 0.5]], device=device)
        rows = pygen.fused_diffusion_mse(out, x0, coeffs, seed=7)
        mu, lv = rand(3, 9, grad=True), rand(3, 9, grad=True)
        z, kl = pygen.reparameterize_kl(mu, lv, seed=8)
        (rows.sum() + kl.sum() + z.float().sum()).backward()
        return [rows, z, kl, out.grad, mu.grad, lv.grad]

    return [("randn", randn), ("q_sample", q_sample), ("reparameterize", reparameterize),
            ("langevin", langevin), ("attention", attention), ("norm", norm), ("losses", losses)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default=None, help="cuda | triton | cpu | torch (default: the device's default)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--only", default=None, help="comma-separated op groups to run")
    args = p.parse_args(argv)
    import pygen

    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    names = [n for n, _ in _ops(device, dtype)]
    if args.only:
        wanted = set(args.only.split(","))
        names = [n for n in names if n in wanted]
    failed = []
    for name in names:
        try:
            # fresh inputs from the same seed for the reference and the backend under test
            with pygen.use_backend("torch"):
                ref = [r.detach().float() for r in dict(_ops(device, dtype, reference=True))[name]()]
            fn = dict(_ops(device, dtype))[name]
            if args.backend is None:
                got = fn()
            else:
                with pygen.use_backend(args.backend):
                    got = fn()
            if args.device == "cuda":
                torch.cuda.synchronize()
            got = [x.detach().float() for x in got]
            tol = 5e-2 if dtype != torch.float32 else 1e-3
            for i, (a, b) in enumerate(zip(got, ref)):
                if a.shape != b.shape:
                    raise AssertionError(f"output {i}: shape {tuple(a.shape)} vs reference {tuple(b.shape)}")
                if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
                    raise AssertionError(f"output {i}: finite pattern differs from the reference")
                scale = b[torch.isfinite(b)].abs().max().item() if torch.isfinite(b).any() else 1.0
                err = (a - b).nan_to_num(0.0).abs().max().item() if a.numel() else 0.0
                if err > tol * max(scale, 1.0):
                    raise AssertionError(f"output {i}: max error {err:.3g} > {tol} x {max(scale, 1.0):.3g}")
            print(f"op_smoke: {name}: ok ({len(got)} outputs)")
        except Exception:  # noqa: BLE001  (report every failing group, then exit 1)
            failed.append(name)
            print(f"op_smoke: {name}: FAILED")
            traceback.print_exc()
    print(f"op_smoke: {len(names) - len(failed)}/{len(names)} groups ok on device={args.device} "
          f"backend={args.backend or 'default'} dtype={args.dtype}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
