"""A sampler as a coefficient program: a table on the device plus one fused step per model call.

``StepProgram`` holds what a sampler loop needs to run with no host sync after
set-up: the coefficient table (one row per model evaluation, columns of
csrc/include/pygen/step.h), the step index on the device (advanced by the
step itself), the history buffer of multistep / two-stage methods, and the
backend launcher of ``torch.ops.pygen.sampler_step_out`` resolved once.

Per model evaluation the loop calls ``program.step(x, model_out, out)``: one
launch of the fused step, which also increments the row index (on CUDA/Triton
the last block of the launch does), no allocation, no ``.item()``. In-kernel noise of row ``k`` is
``pygen.randn(x.shape, seed, stream + k)``.
"""
import sys
import warnings

import torch

from pygen import _backend
from pygen.ops._common import check_stream, split_seed
from pygen.ops.schedule import COL_HIST

__all__ = ["StepProgram", "check_model_out", "resolve_step_launcher", "capture_step", "graph_device", "StepGraphs"]


def resolve_step_launcher(device):
    """The sampler_step_out implementation of the backend chosen for ``device`` (resolved once)."""
    backend = _backend.resolve(device)
    if backend == "torch":
        from pygen.ops.step import sampler_step_reference

        return sampler_step_reference
    if backend == "triton":
        from pygen.kernels import step as tk

        return tk.sampler_step_out
    return torch.ops.pygen.sampler_step_out.default


def check_model_out(out, x, what="model(x, sigma)"):
    """A model output must match x in shape, dtype and device (a metadata check, no sync)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{what} must return a torch.Tensor, got {type(out).__name__}")
    if out.shape != x.shape:
        raise ValueError(f"{what} returned shape {tuple(out.shape)}, expected the shape of x {tuple(x.shape)}")
    if out.dtype != x.dtype:
        raise TypeError(f"{what} returned dtype {out.dtype}, expected the dtype of x ({x.dtype})")
    if out.device != x.device:
        raise ValueError(f"{what} returned a tensor on {out.device}, expected x's device ({x.device})")
    return out if out.is_contiguous() else out.contiguous()


class StepProgram:
    """A coefficient table (K rows, one per model evaluation) run by the fused step.

    Args:
        rows: float tensor (K, 8 + H) on any device (moved/cast once; used as is when it is already
            on x's device in the accumulation dtype, float32 or float64 for float64 x).
        x: a tensor with the sample's shape, dtype and device.
        seed: int or per-row int64 seeds (for rows with in-kernel noise).
        stream: in-kernel noise of row k uses stream ``stream + k``.
    """

    def __init__(self, rows, x, *, seed=0, stream=0):
        if rows.dim() != 2 or rows.shape[1] < COL_HIST or rows.shape[0] < 1:
            raise ValueError(f"rows must be a (K >= 1, 8 + H) table, got {tuple(rows.shape)}")
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        self.coeffs = rows.to(device=x.device, dtype=acc).contiguous()  # (no copy when already there)
        self.num_rows = rows.shape[0]
        self.index = torch.zeros(1, dtype=torch.int64, device=x.device)
        num_hist = rows.shape[1] - COL_HIST
        self.history = torch.zeros((num_hist,) + tuple(x.shape), dtype=x.dtype, device=x.device) if num_hist else None
        self.seed, self.row_seeds = split_seed(seed, x.shape[0], x.device)
        self.stream = check_stream(stream)
        self._launch = resolve_step_launcher(x.device)

    def reset(self):
        """Back to row 0 (history cleared), for a replay of the same program."""
        self.index.zero_()
        if self.history is not None:
            self.history.zero_()

    def step(self, x, model_out, out, noise=None):
        """One fused update with the current row; advances the row index on the device."""
        self._launch(x, model_out, self.coeffs, self.index, self.history, noise, out, None, self.seed, self.stream,
                     self.row_seeds, 0.0, True)
        return out


def _caller_stacklevel():
    """The ``stacklevel`` (for a warning raised by this helper's caller) of the first frame outside
    pygen (and outside torch's decorator wrappers such as ``torch.no_grad``): the user's call, however
    deep inside pygen the warning comes from."""
    frame, level = sys._getframe(1), 1
    while frame is not None and _inside(frame.f_globals.get("__name__", "")):
        frame, level = frame.f_back, level + 1
    return level


def _inside(module):
    return module == "pygen" or module.startswith("pygen.") or module == "torch.utils._contextlib"


def graph_device(x):
    """Whether ``cuda_graph=True`` can capture a loop on ``x`` (a CUDA tensor); if not, one warning
    pointing at the user's call says the loop runs eagerly."""
    if x.device.type == "cuda":
        return True
    warnings.warn("cuda_graph=True needs CUDA tensors; running eagerly", stacklevel=_caller_stacklevel())
    return False


def capture_step(warmup, step, *, fallback=True):
    """A CUDA graph of ``step()`` (one loop step whose per-step values all come from device state, e.g.
    the row index of a ``StepProgram``), after ``warmup()`` (the loop's first step, run eagerly) ran on
    a side stream, so lazy initialisation and allocations stay out of the capture. None, with one
    warning naming the cause and pointing at the user's call, when ``step`` cannot be captured (a
    host sync, a CPU tensor, an unsupported op): the caller then finishes eagerly. ``fallback=False``
    lets the capture's exception propagate instead (benchmarks)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        warmup()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()
    except Exception as err:  # noqa: BLE001 - whatever stops the capture: say so once, finish eagerly
        if not fallback:
            raise
        warnings.warn(f"cuda_graph=True: the model could not be captured in a CUDA graph ({err}); "
                      "running eagerly", stacklevel=_caller_stacklevel())
        return None
    return graph


class StepGraphs:
    """A loop's kinds of step (e.g. an MCMC move, or a replica swap round of each parity), each captured in a
    CUDA graph and replayed.

    ``graphs(key, step, *args)`` runs one step of kind ``key`` and returns what ``step(*args)`` returns. With
    ``enabled`` the first call of a key runs ``step`` for real as ``capture_step``'s warm-up, then
    captures it; later calls replay that graph and return the captured call's outputs (the replay
    rewrote them). So while ``enabled``, ``step`` must take every per-step value from device state
    (counters it advances itself) and update the loop state in place. A capture that fails warns
    once (see ``capture_step``), drops every graph captured so far and clears ``enabled``: every later
    step runs eagerly (and may take host values again); without ``enabled``, every step does.
    """

    def __init__(self, enabled):
        self.enabled = enabled
        self._graphs = {}

    def __call__(self, key, step, *args):
        if not self.enabled:  # (then no graph is kept either)
            return step(*args)
        entry = self._graphs.get(key)
        if entry is not None:
            entry[0].replay()
            return entry[1][-1]  # the captured call's outputs (the last the step produced)
        outs = []
        graph = capture_step(lambda: outs.append(step(*args)), lambda: outs.append(step(*args)))
        if graph is None:  # no replays from here on: the eager steps need not match a graph's counters
            self.enabled = False
            self._graphs.clear()
        else:
            self._graphs[key] = (graph, outs)
        return outs[0]
