"""Triton backend of ``pygen.sampler_step`` (op ``pygen::sampler_step_out``).

The general fused sampler step of csrc/include/pygen/step.h: coefficients read
from a table at a step index held in a tensor, noise drawn in the kernel when
not given. Grid: (blocks of 4*BLOCK elements, noise rows); a noise row is the
whole tensor for one step index and an int seed, else one batch row.

advance=True with one step index: the launch itself increments the index (the last
program to finish stores index + 1; see "In-kernel advance" in csrc/include/pygen/step.h:
while the launch runs the index word also counts the programs done, in bits 40-63).
"""
import triton
import triton.language as tl

from pygen.kernels.philox import interleave4, philox_normals

BLOCK = 256  # Philox groups per program -> 1024 elements
ADVANCE_SHIFT = tl.constexpr(40)  # pygen::step::kAdvanceShift
ADVANCE_UNIT = tl.constexpr(1 << 40)
ADVANCE_SIGN = tl.constexpr(24)  # 64 - ADVANCE_SHIFT: sign-extends the low 40 bits
MAX_ADVANCE_PROGRAMS = 1 << 23  # pygen::step::kMaxAdvanceBlocks


@triton.jit(do_not_specialize=["seed", "stream"])
def _sampler_step_kernel(x_ptr, m_ptr, coeffs_ptr, steps_ptr, hist_ptr, noise_ptr, out_ptr, pred_ptr, row_seeds_ptr,
                         seed, stream, clamp, num_steps, row_len, hist_stride,
                         WIDTH: tl.constexpr, NUM_HIST: tl.constexpr, PER_ROW_STEPS: tl.constexpr,
                         PER_ROW_SEEDS: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_PRED: tl.constexpr,
                         CLAMP: tl.constexpr, FUSED_ADVANCE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1).to(tl.int64)
    if PER_ROW_STEPS:
        step = tl.load(steps_ptr + r)
    elif FUSED_ADVANCE:  # the word may carry the count of programs already done (bits 40-63)
        raw = tl.load(steps_ptr, volatile=True)
        step = (raw << ADVANCE_SIGN) >> ADVANCE_SIGN
    else:
        step = tl.load(steps_ptr)
    valid = (step >= 0) & (step < num_steps)
    row = coeffs_ptr + tl.where(valid, step, 0) * WIDTH
    acc_ty = coeffs_ptr.dtype.element_ty
    nan = float("nan")
    cx = tl.where(valid, tl.load(row + 0), nan).to(acc_ty)
    cm = tl.where(valid, tl.load(row + 1), nan).to(acc_ty)
    a = tl.where(valid, tl.load(row + 2), nan).to(acc_ty)
    b = tl.where(valid, tl.load(row + 3), nan).to(acc_ty)
    s = tl.where(valid, tl.load(row + 4), nan).to(acc_ty)
    offs = pid * (4 * BLOCK) + tl.arange(0, 4 * BLOCK)
    mask = offs < row_len
    e = r * row_len + offs
    x = tl.load(x_ptr + e, mask=mask, other=0.0).to(acc_ty)
    m = tl.load(m_ptr + e, mask=mask, other=0.0).to(acc_ty)
    d = cx * x + cm * m
    if CLAMP:
        d = tl.where(d < -clamp, -clamp, tl.where(d > clamp, clamp, d))
    if HAS_NOISE:
        z = tl.load(noise_ptr + e, mask=mask, other=0.0).to(acc_ty)
    else:
        if PER_ROW_SEEDS:
            seed = tl.load(row_seeds_ptr + r)
        group = pid * BLOCK + tl.arange(0, BLOCK)
        z0, z1, z2, z3 = philox_normals(seed, stream + step, group)
        z = interleave4(z0, z1, z2, z3).to(acc_ty)
    xn = a * x + b * d + s * z
    if NUM_HIST > 0:
        slot = tl.where(valid, tl.load(row + 7), -1.0).to(tl.int32)
        hx = tl.load(row + 5).to(acc_ty)
        hd = tl.load(row + 6).to(acc_ty)
        new_h = hx * x + hd * d
        for j in tl.static_range(NUM_HIST):
            cj = tl.where(valid, tl.load(row + 8 + j), nan).to(acc_ty)
            hj = tl.load(hist_ptr + j * hist_stride + e, mask=mask, other=0.0).to(acc_ty)
            xn += cj * hj
            tl.store(hist_ptr + j * hist_stride + e, new_h.to(hist_ptr.dtype.element_ty), mask=mask & (slot == j))
    if HAS_PRED:
        tl.store(pred_ptr + e, d.to(pred_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + e, xn.to(out_ptr.dtype.element_ty), mask=mask)
    if FUSED_ADVANCE:
        tl.debug_barrier()  # every thread of the program has read the index
        old = tl.atomic_add(steps_ptr, ADVANCE_UNIT)
        if ((old - step) >> ADVANCE_SHIFT) == tl.num_programs(0) * tl.num_programs(1) - 1:  # the last one
            tl.atomic_xchg(steps_ptr, step + 1)


def sampler_step_out(x, model_out, coeffs, step_index, history, noise, out, pred_x0, seed, stream, row_seeds, clamp,
                     advance):
    """Launch the fused step on contiguous tensors (see pygen.sampler_step)."""
    numel = x.numel()
    fused_advance = False
    if numel:
        batch = x.shape[0]
        per_row_steps = step_index.shape[0] > 1
        per_row = per_row_steps or row_seeds is not None
        rows, row_len = (batch, numel // batch) if per_row else (1, numel)
        num_hist = coeffs.shape[1] - 8
        grid = (triton.cdiv(row_len, 4 * BLOCK), rows)
        fused_advance = bool(advance) and not per_row_steps and grid[0] * grid[1] <= MAX_ADVANCE_PROGRAMS
        _sampler_step_kernel[grid](
            x, model_out, coeffs, step_index, history if history is not None else x,
            noise if noise is not None else x, out, pred_x0 if pred_x0 is not None else x,
            row_seeds if row_seeds is not None else step_index, seed, stream, float(clamp), coeffs.shape[0], row_len,
            numel, WIDTH=coeffs.shape[1], NUM_HIST=num_hist, PER_ROW_STEPS=per_row_steps,
            PER_ROW_SEEDS=row_seeds is not None, HAS_NOISE=noise is not None, HAS_PRED=pred_x0 is not None,
            CLAMP=clamp > 0, FUSED_ADVANCE=fused_advance, BLOCK=BLOCK)
    if advance and not fused_advance:
        step_index.add_(1)
