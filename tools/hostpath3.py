"""Host-path figures of session 8, one checkout, CPU, tiny tensors: prints JSON {case: value}.

    git worktree add /tmp/old <rev>; cp pygen/_C*.so /tmp/old/pygen/   (when csrc/ did not change)
    for r in 1 2 3; do python tools/hostpath3.py /tmp/old > old_$r.json; python tools/hostpath3.py . > new_$r.json; done

Cases: ``pygen.sample``'s loop, µs per model evaluation (no-op eps model, 1x4x8x8, 100 Karras steps,
timed from the first to the last model call, best of 30 runs), and ``pygen.losses.diffusion_loss``
forward + backward, µs per call (16x4x4x4, the loss benchmark's train-step model, best of 7 batches),
with its device ops per call (ops that launch a kernel on a GPU, counted by a dispatch mode).
"""
import json
import os
import sys
import time

repo = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else os.getcwd()
sys.path.insert(0, repo)
sys.path.insert(0, repo + "/benchmarks")
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

torch.set_num_threads(1)
import pygen  # noqa: E402
import bench_losses as bl  # noqa: E402

assert pygen.__file__.startswith(repo), pygen.__file__
res = {}
x0 = torch.randn(1, 4, 8, 8)
zero = torch.zeros_like(x0)
stamps = []


def eps_noop(x, t):
    stamps.append(time.perf_counter())
    return zero


for name in ("euler", "dpmpp_2m", "euler_ancestral", "heun"):
    best = 1e9
    for _ in range(30):
        stamps.clear()
        pygen.sample(eps_noop, x0, sampler=name, steps=100, progress=False)
        best = min(best, (stamps[-1] - stamps[0]) / (len(stamps) - 1))
    res[f"pygen.sample {name} us/eval"] = best * 1e6


def timeit(fn, n=2000):
    for _ in range(100):
        fn()
    best = 1e9
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


impls, _ = bl.build_impls("diffusion_loss", (16, 4, 4, 4), torch.float32, "cpu")
for impl in impls:
    res[f"diffusion_loss step {impl.backend} us"] = timeit(impl.fn)


class Count(TorchDispatchMode):
    NO_KERNEL = {"empty", "empty_like", "empty_strided", "view", "expand", "as_strided", "detach", "alias",
                 "reshape", "_unsafe_view", "select", "slice", "unsqueeze", "squeeze", "t"}

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func.__name__.split(".")[0] not in self.NO_KERNEL
        return func(*args, **(kwargs or {}))


for impl in impls:
    with Count() as c:
        impl.fn()
    res[f"diffusion_loss step {impl.backend} device ops"] = c.n
print(json.dumps(res))
