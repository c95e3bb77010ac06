"""The general fused sampler step: ``pygen.sampler_step``.

Op: ``torch.ops.pygen.sampler_step_out(x, model_out, coeffs, step_index,
history, noise, out, pred_x0, seed, stream, row_seeds, clamp, advance)``.
Backends: torch reference (this file), Triton (kernels/step.py), C++ CPU
(csrc/cpu/step.cpp), CUDA (csrc/cuda/step.cu).

Per element, with table row ``i = step_index`` (one index, or one per batch row)
of a coefficient table from ``pygen.step_coefficients`` (columns in
csrc/include/pygen/step.h)::

    d       = cx·x + cm·model_out            # pred_x0 / denoised / score
    d       = clamp(d, -clamp, clamp)        # optional (clip_sample); NaN stays NaN
    x_next  = a·x + b·d + Σ_j hist_j·history[j] + s·z
    history[slot] = hx·x + hd·d              # when the row's slot >= 0
    step_index += 1                          # when advance=True (one index: in the same launch
                                             # on CUDA/Triton; a step index there must lie in
                                             # [-2^39, 2^39), see csrc/include/pygen/step.h)

``z`` is ``noise`` if given, else drawn in the kernel: exactly
``pygen.randn(x.shape, seed, stream + i)`` for one step index; with per-row
step indices or per-row seeds, row r gets
``pygen.randn(x[r:r+1].shape, seed_r, stream + i_r)``.
An out-of-range step index never reads outside the table: its rows come out NaN.
The step index lives on the device, so a captured step replays for every
step with no host sync.
"""
import torch

from pygen import _backend
from pygen.ops._common import check_like, check_stream, check_tensor, contiguous, split_seed
from pygen.ops.random import philox_words, randn_reference, words_to_normals
from pygen.ops.schedule import COL_A, COL_B, COL_CM, COL_CX, COL_HD, COL_HIST, COL_HX, COL_S, COL_SLOT

__all__ = ["sampler_step"]


# ---------------------------------------------------------------------------
# torch reference
# ---------------------------------------------------------------------------
def step_noise_reference(x, step_index, seed, stream, row_seeds):
    """The noise the step draws in-kernel (see the module docstring): streams ``stream + step`` formed on the
    device (no host read of the step index)."""
    if row_seeds is None and step_index.numel() == 1:
        return randn_reference(x.shape, seed, step_index[0] + stream, device=x.device)
    # one noise row per batch row: its own key (per-row seed, or the int seed) and step
    b = x.shape[0]
    row_len = x.numel() // b
    keys = row_seeds if row_seeds is not None else torch.full((b,), seed, dtype=torch.int64, device=x.device)
    streams = (step_index + stream).expand(b).reshape(b, 1)
    groups = torch.arange(-(-row_len // 4), dtype=torch.int64, device=x.device).view(1, -1)
    z = words_to_normals(*philox_words(keys.view(b, 1), streams, groups)).reshape(b, -1)[:, :row_len]
    return z.reshape(x.shape)


def sampler_step_reference(x, model_out, coeffs, step_index, history, noise, out, pred_x0, seed, stream, row_seeds,
                           clamp, advance):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    n = coeffs.shape[0]
    idx = step_index.to(torch.int64)
    valid = (idx >= 0) & (idx < n)
    rows = coeffs[idx.clamp(0, max(n - 1, 0))].to(acc)
    rows = torch.where(valid.view(-1, 1), rows, torch.full_like(rows, float("nan")))
    view = (-1,) + (1,) * (x.dim() - 1)

    def col(c):
        return rows[:, c].view(view)

    xa = x.to(acc)
    d = col(COL_CX) * xa + col(COL_CM) * model_out.to(acc)
    if clamp > 0:
        d = d.clamp(-clamp, clamp)
    if noise is not None:
        z = noise.to(acc)
    elif not rows.is_cpu or bool((rows[:, COL_S] != 0).any()):  # (NaN != 0: invalid rows draw, stay NaN)
        # (on a device, always drawn: deciding would read the table back to the host, a sync per step)
        z = step_noise_reference(x, idx, seed, stream, row_seeds).to(acc)
    else:  # no row adds noise: the kernels skip drawing it too
        z = torch.zeros_like(xa)
    x_next = col(COL_A) * xa + col(COL_B) * d + col(COL_S) * z
    num_hist = coeffs.shape[1] - COL_HIST
    for j in range(num_hist):
        x_next = x_next + col(COL_HIST + j) * history[j].to(acc)
    if num_hist > 0:
        new_h = col(COL_HX) * xa + col(COL_HD) * d
        slot = rows[:, COL_SLOT]
        for j in range(num_hist):
            write = (slot == j) & valid
            history[j].copy_(torch.where(write.view(view), new_h, history[j].to(acc)).to(history.dtype))
    if pred_x0 is not None:
        pred_x0.copy_(d.to(pred_x0.dtype))
    out.copy_(x_next.to(out.dtype))
    if advance:
        step_index.add_(1)


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------
def sampler_step(x, model_out, coeffs, step_index, *, history=None, noise=None, seed=0, stream=0, clamp=None,
                 return_pred_x0=False, advance=False, out=None):
    """One fused sampler update (see the module docstring for the math).

    Args:
        x: current sample, (B, ...) float tensor.
        model_out: the model's output for ``x`` (same shape/dtype/device).
        coeffs: table from ``pygen.step_coefficients``; float32, or float64 for
            float64 ``x``.
        step_index: int64 tensor on ``x.device``: shape (1,) for one step for
            the whole batch, or (B,) for one step per row.
        history: (H, B, ...) buffer for multistep/2nd-order kinds (H = table
            width - 8), updated in place; x's dtype, or float32 for float16/bfloat16
            x (read and written unrounded, as diffusers' multistep schedulers keep it).
        noise: explicit noise (same shape as x); else drawn in the kernel from
            ``seed`` (int or per-row int64 tensor) and ``stream + step``.
        clamp: clip the predicted x0 to [-clamp, clamp] (diffusers clip_sample).
        return_pred_x0: also return the predicted x0 / denoised estimate.
        advance: increment ``step_index`` on the device after the step (with one index, the
            CUDA and Triton kernels do it in the same launch: the last block to finish).
        out: where to write x_next (may be ``x`` itself for an in-place step).

    Returns ``x_next`` (``out``), or ``(x_next, pred_x0)``.
    """
    check_tensor("x", x, ndim_min=1)
    check_like("model_out", model_out, "x", x)
    check_tensor("coeffs", coeffs, dtypes=(torch.float32, torch.float64), device=x.device)
    want = torch.float64 if x.dtype == torch.float64 else torch.float32
    if coeffs.dtype != want:
        raise TypeError(f"coeffs must be {want} for {x.dtype} x, got {coeffs.dtype}")
    if coeffs.dim() != 2 or coeffs.shape[1] < COL_HIST or coeffs.shape[0] < 1:
        raise ValueError(f"coeffs must be a (steps, 8 + H) table from pygen.step_coefficients, got shape {tuple(coeffs.shape)}")
    num_hist = coeffs.shape[1] - COL_HIST
    batch = x.shape[0]
    check_tensor("step_index", step_index, dtypes=(torch.int64,), device=x.device)
    if step_index.dim() != 1 or step_index.shape[0] not in (1, batch):
        raise ValueError(f"step_index must have shape (1,) or (batch,) = ({batch},), got {tuple(step_index.shape)}")
    if num_hist:
        if history is None:
            raise ValueError(f"history is required: coeffs has {num_hist} history column(s)")
        check_tensor("history", history, dtypes=(x.dtype, want), device=x.device)  # float32 for half x too
        if tuple(history.shape) != (num_hist,) + tuple(x.shape):
            raise ValueError(f"history must have shape {(num_hist,) + tuple(x.shape)}, got {tuple(history.shape)}")
        if not history.is_contiguous():
            raise ValueError("history must be contiguous (it is updated in place)")
    elif history is not None:
        raise ValueError("history was given but coeffs has no history columns")
    if advance and step_index.shape[0] != 1 and batch != 1:
        raise ValueError("advance=True needs a single step index of shape (1,)")
    if noise is not None:
        check_like("noise", noise, "x", x)
        seed_i, row_seeds = 0, None
    else:
        seed_i, row_seeds = split_seed(seed, batch, x.device)
    stream = check_stream(stream)
    if clamp is None:
        clamp = 0.0
    elif not clamp > 0:
        raise ValueError(f"clamp must be None or > 0, got {clamp}")
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    else:
        check_like("out", out, "x", x)
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")
    pred = torch.empty_like(out) if return_pred_x0 else None
    args = (contiguous(x), contiguous(model_out), contiguous(coeffs), step_index, history,
            None if noise is None else contiguous(noise), out, pred, seed_i, stream, row_seeds, float(clamp),
            bool(advance))
    backend = _backend.resolve(x.device)
    if backend == "torch":
        sampler_step_reference(*args)
    elif backend == "triton":
        from pygen.kernels import step as tk

        tk.sampler_step_out(*args)
    else:
        torch.ops.pygen.sampler_step_out.default(*args)
    return (out, pred) if return_pred_x0 else out


# ---------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------
def _register():
    from pygen.ops import _registry

    def triton_impl(*args):
        from pygen.kernels import step as tk

        tk.sampler_step_out(*args)

    mutated = ("step_index", "history", "out", "pred_x0")
    _registry.register_reference("sampler_step_out", sampler_step_reference)
    _registry.register_triton("sampler_step_out", triton_impl, mutates_args=mutated)
    _registry.register_fake("sampler_step_out", lambda *args: None)


_register()
