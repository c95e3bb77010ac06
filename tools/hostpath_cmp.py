"""Host-path microbenchmarks of one checkout, CPU, tiny tensors: prints JSON {case: µs per call}.

At these sizes the time is mostly the host path (Python, the dispatcher, autograd, the kernel
call), the part that does not shrink on a GPU. Compare two checkouts side by side, alternating:

    git worktree add /tmp/old <rev> && (cd /tmp/old && python setup.py build_ext --inplace)
    for r in 1 2 3; do python tools/hostpath_cmp.py /tmp/old > old_$r.json
                       python tools/hostpath_cmp.py . > new_$r.json; done

Cases: the loss benchmark's step bodies (benchmarks/bench_losses.py) at 16x4x4x4, fused
diffusion MSE forward+backward, q_sample with in-kernel noise, a DiT block (hidden 64, 2 heads,
8 tokens) against the eager reference block, forward and forward+backward, and one step of the
fused DDIM (default config) and DPM-Solver++ 2M (fp16) schedulers against stock diffusers.
"""
import json
import os
import sys
import time

repo = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else os.getcwd()
sys.path.insert(0, repo); sys.path.insert(0, repo + "/benchmarks")
import torch
torch.set_num_threads(1)
import pygen, pygen.nn as pnn
import bench_losses as bl
from pygen.nn.reference import EagerDiTBlock
import diffusers, pygen.diffusers as pd

def timeit(fn, n):
    for _ in range(max(10, n // 20)): fn()
    best = 1e9
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n): fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6

res = {}
shape = (16, 4, 4, 4)
for case in ("train-step", "loss-only"):
    impls, _ = bl.build_impls(case, shape, torch.float32, "cpu")
    for i in impls:
        res[f"loss {case} {i.backend}"] = timeit(i.fn, 2000)
x0 = torch.randn(shape); out = torch.randn(shape, requires_grad=True)
coeffs = torch.tensor([[1.0, 0, 1, 1]]).expand(16, 4).contiguous()
g = torch.ones(16) / 16
res["fused_diffusion_mse fwd+bwd"] = timeit(lambda: torch.autograd.grad(pygen.fused_diffusion_mse(out, x0, coeffs, seed=1, stream=7), out, g), 2000)
abar = bl._alphas_cumprod("cpu"); t = torch.randint(0, 1000, (16,))
res["q_sample (noise drawn)"] = timeit(lambda: pygen.q_sample(x0, t, abar, seed=1, stream=7), 2000)

hidden, heads, N, B = 64, 2, 8, 1
blk = pnn.DiTBlock(hidden, heads); eag = EagerDiTBlock(hidden, heads)
eag.load_state_dict(blk.state_dict(), strict=False)
x = torch.randn(B, N, hidden); c = torch.randn(B, hidden); xg = x.clone().requires_grad_()
with torch.no_grad():
    res["dit fwd eager"] = timeit(lambda: eag(x, c), 500)
    res["dit fwd pygen"] = timeit(lambda: blk(x, c), 500)
def fb(m):
    m(xg, c).sum().backward()
res["dit fwd+bwd eager"] = timeit(lambda: fb(eag), 300)
res["dit fwd+bwd pygen"] = timeit(lambda: fb(blk), 300)

def sched_step(cls, dtype, n=300):
    s = cls(); s.set_timesteps(50)
    xs = torch.randn(1, 4, 8, 8).to(dtype); mo = torch.randn_like(xs); ts = list(s.timesteps)
    state = {"i": 0}
    def one():
        if state["i"] == len(ts):
            s.set_timesteps(50); state["i"] = 0
        tt = ts[state["i"]]; state["i"] += 1
        return s.step(mo, tt, xs).prev_sample
    return timeit(one, n)
res["DDIM default fp32 step stock"] = sched_step(diffusers.DDIMScheduler, torch.float32)
res["DDIM default fp32 step fused"] = sched_step(pd.DDIMScheduler, torch.float32)
res["DPM++2M fp16 step stock"] = sched_step(diffusers.DPMSolverMultistepScheduler, torch.float16)
res["DPM++2M fp16 step fused"] = sched_step(pd.DPMSolverMultistepScheduler, torch.float16)
print(json.dumps(res))
