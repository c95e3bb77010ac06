"""pytest plugin: append each failure to $PYGEN_FAILLOG as it happens (``-p pytest_faillog``).

For the GPU session's suite run (tools/gpu_session.sh suite): a run cut off by its time limit still
leaves the failures it saw, with their tracebacks, where a normal pytest prints them only at the end.
Under pytest-xdist only the controller writes (workers' reports reach it too).
"""
import os


def pytest_runtest_logreport(report):
    path = os.environ.get("PYGEN_FAILLOG")
    if not path or not report.failed or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    with open(path, "a") as f:
        f.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext[-2500:]}\n")
