"""pygen.sampler_step (DDIM coefficients from a device table at a device step index) vs eager DDIM math.

ddim_step:      eta = 0, no noise (compare with the copy baseline in bench_baseline.py)
ddim_step+rng:  eta = 1, noise drawn in the kernel vs torch.randn + eager math
"""
OPS = ["ddim_step", "ddim_step+rng"]


def test_step(run_case, bench_params):
    run_case(bench_params)
