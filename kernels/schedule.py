"""Triton backend of ``pygen.step_coefficients`` (op ``pygen::step_coefficients``).

The whole per-step coefficient table of a sampler in one launch: one lane per
step, float64 arithmetic, the formulas of csrc/include/pygen/step.h
(``coefficient_row``); the table columns are listed there.
"""
import torch
import triton
import triton.language as tl

BLOCK = 128
_COL_HIST = 8


@triton.jit
def _prediction_coefs(prediction, sat, s1at, std_or_sigma, FAMILY: tl.constexpr):
    """(cx, cm) for the model's prediction type; FAMILY 0 = VP discrete, 1 = sigma, 2 = SDE score."""
    nan = float("nan")
    zero = tl.zeros_like(sat)
    if FAMILY == 0:
        cx = tl.where(prediction == 0, 1.0 / sat, tl.where(prediction == 1, zero, tl.where(prediction == 2, sat, nan)))
        cm = tl.where(prediction == 0, -s1at / sat, tl.where(prediction == 1, zero + 1.0,
                      tl.where(prediction == 2, -s1at, nan)))
    elif FAMILY == 1:
        cx = tl.where(prediction == 0, zero + 1.0, tl.where(prediction == 1, zero, nan))
        cm = tl.where(prediction == 0, -std_or_sigma, tl.where(prediction == 1, zero + 1.0, nan))
    else:
        cx = zero
        cm = tl.where(prediction == 0, -1.0 / std_or_sigma, tl.where(prediction == 1, zero + 1.0, nan))
    return cx, cm


@triton.jit
def _step_coefficients_kernel(levels_ptr, out_ptr, params_ptr, n, prediction,
                              KIND: tl.constexpr, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    # eta, param0, param1 arrive as float64 in a tensor: scalar float args would be fp32.
    eta = tl.load(params_ptr + 0)
    p0 = tl.load(params_ptr + 1)
    p1 = tl.load(params_ptr + 2)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    l0 = tl.load(levels_ptr + i, mask=mask, other=0.5).to(tl.float64)
    l1 = tl.load(levels_ptr + i + 1, mask=mask, other=0.5).to(tl.float64)
    zero = tl.zeros_like(l0)
    a = zero
    b = zero
    s = zero
    hx = zero
    hd = zero
    slot = zero - 1.0
    hist = zero
    if KIND == 0 or KIND == 1:
        at = l0
        ap = l1
        sat = tl.sqrt(at)
        s1at = tl.sqrt(1.0 - at)
        cx, cm = _prediction_coefs(prediction, sat, s1at, zero, FAMILY=0)
        if KIND == 0:
            var = (1.0 - ap) / (1.0 - at) * (1.0 - at / ap)
            std = eta * tl.sqrt(var)
            direction = tl.sqrt(1.0 - ap - std * std)
            a = direction / s1at
            b = tl.sqrt(ap) - direction * sat / s1at
            s = std
        else:
            cur_alpha = at / ap
            cur_beta = 1.0 - cur_alpha
            a = tl.sqrt(cur_alpha) * (1.0 - ap) / (1.0 - at)
            b = tl.sqrt(ap) * cur_beta / (1.0 - at)
            var = tl.maximum((1.0 - ap) / (1.0 - at) * cur_beta, 1e-20)
            s = tl.where((i == n - 1) & (ap >= 1.0), zero, tl.sqrt(var))
    elif KIND == 2 or KIND == 3 or KIND == 4:
        sig = l0
        sn = l1
        cx, cm = _prediction_coefs(prediction, zero + 1.0, zero, sig, FAMILY=1)
        if KIND == 2:
            a = sn / sig
            b = 1.0 - sn / sig
        elif KIND == 3:
            up = tl.minimum(sn, eta * tl.sqrt(sn * sn * (sig * sig - sn * sn) / (sig * sig)))
            down = tl.sqrt(sn * sn - up * up)
            a = down / sig
            b = 1.0 - down / sig
            s = up
        else:
            hd = zero + 1.0
            slot = zero
            h = tl.log(sig) - tl.log(sn)
            em1 = tl.exp(-h) - 1.0
            lp = tl.load(levels_ptr + i - 1, mask=mask & (i > 0), other=1.0).to(tl.float64)
            r = (tl.log(lp) - tl.log(sig)) / h
            first = i == 0
            a = sn / sig
            b = tl.where(first, -em1, -em1 * (1.0 + 1.0 / (2.0 * r)))
            hist = tl.where(first, zero, em1 / (2.0 * r))
            last = sn == 0.0
            a = tl.where(last, zero, a)
            b = tl.where(last, zero + 1.0, b)
            hist = tl.where(last, zero, hist)
    else:
        t = l0
        dt = l1 - l0
        if KIND == 5:
            beta = p0 + t * (p1 - p0)
            f = -0.5 * beta
            g2 = beta
            log_mean = -0.25 * t * t * (p1 - p0) - 0.5 * t * p0
            std = tl.sqrt(1.0 - tl.exp(2.0 * log_mean))
        else:
            sigma = p0 * tl.exp(t * tl.log(p1 / p0))
            f = zero
            g2 = sigma * sigma * 2.0 * tl.log(p1 / p0)
            std = sigma
        cx, cm = _prediction_coefs(prediction, zero, zero, std, FAMILY=2)
        a = 1.0 + f * dt
        b = -g2 * dt
        s = tl.sqrt(g2 * tl.abs(dt))
    row = out_ptr + i * WIDTH
    ty = out_ptr.dtype.element_ty
    tl.store(row + 0, cx.to(ty), mask=mask)
    tl.store(row + 1, cm.to(ty), mask=mask)
    tl.store(row + 2, a.to(ty), mask=mask)
    tl.store(row + 3, b.to(ty), mask=mask)
    tl.store(row + 4, s.to(ty), mask=mask)
    tl.store(row + 5, hx.to(ty), mask=mask)
    tl.store(row + 6, hd.to(ty), mask=mask)
    tl.store(row + 7, slot.to(ty), mask=mask)
    if WIDTH > 8:
        tl.store(row + 8, hist.to(ty), mask=mask)


def step_coefficients(levels, kind, prediction, eta, param0, param1):
    n = levels.shape[0] - 1
    width = _COL_HIST + (1 if kind == 4 else 0)
    out_dtype = torch.float64 if levels.dtype == torch.float64 else torch.float32
    out = torch.empty((n, width), dtype=out_dtype, device=levels.device)
    if kind < 0 or kind > 6:
        out.fill_(float("nan"))
        return out
    params = torch.tensor([eta, param0, param1], dtype=torch.float64, device=levels.device)
    grid = (triton.cdiv(n, BLOCK),)
    _step_coefficients_kernel[grid](levels, out, params, n, prediction, KIND=kind, WIDTH=width, BLOCK=BLOCK)
    return out
