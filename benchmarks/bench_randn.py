"""pygen.randn (Philox normals) vs torch.randn with a torch.Generator."""
OPS = ["randn"]


def test_randn(run_case, bench_params):
    run_case(bench_params)
