"""Forward-process ops: pygen.q_sample and pygen.reparameterize vs their eager composites.

q_sample:        x_t = sqrt(ab[t]) x0 + sqrt(1 - ab[t]) noise (per-row t, noise given)
q_sample+rng:    the same with the noise drawn in the kernel (eager: torch.randn + the math)
reparameterize:  z = mu + exp(logvar / 2) noise (noise given; +rng: drawn in the kernel)
"""
OPS = ["q_sample", "q_sample+rng", "reparameterize", "reparameterize+rng"]


def test_forward(run_case, bench_params):
    run_case(bench_params)
