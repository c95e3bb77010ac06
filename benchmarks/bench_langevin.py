"""pygen.langevin_step vs eager x + dt/2 score + sqrt(dt) noise (noise given, and drawn in the kernel)."""
OPS = ["langevin_step", "langevin_step+rng"]


def test_langevin(run_case, bench_params):
    run_case(bench_params)
