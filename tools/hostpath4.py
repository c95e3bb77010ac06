"""Host path of the score-SDE and MCMC loops, one checkout, CPU, tiny tensors: prints JSON {loop: µs per step}.

    git worktree add /tmp/old <rev>; (cd /tmp/old && python setup.py build_ext --inplace)
    for r in 1 2 3; do python tools/hostpath4.py /tmp/old > old_$r.json; python tools/hostpath4.py . > new_$r.json; done

The loops of benchmarks/bench_loops.py (eager, default backend) on an (8, 2) state, so the time is the
Python-to-kernel path: µs per loop step = (T(40 steps) - T(20 steps)) / 20, each T the best of 25 calls.
"""
import json
import os
import sys
import time

repo = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else os.getcwd()
sys.path.insert(0, repo)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import torch  # noqa: E402

torch.set_num_threads(1)
import pygen  # noqa: E402
import bench_loops as bl  # noqa: E402

assert pygen.__file__.startswith(repo), pygen.__file__
x0 = pygen.randn((8, 2), 0)
res = {}
for name in bl.LOOPS:
    short, long = bl.loop_fn(name, x0, 20, False), bl.loop_fn(name, x0, 40, False)
    short(), long()
    best_short = best_long = 1e9
    for _ in range(25):
        t0 = time.perf_counter()
        short()
        t1 = time.perf_counter()
        long()
        t2 = time.perf_counter()
        best_short, best_long = min(best_short, t1 - t0), min(best_long, t2 - t1)
    res[name] = (best_long - best_short) / 20 * 1e6
print(json.dumps(res))
