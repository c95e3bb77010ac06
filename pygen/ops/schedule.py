"""Fused "schedule math": a sampler's whole per-step coefficient table in one launch.

Op: ``torch.ops.pygen.step_coefficients(levels, kind, prediction, eta, param0, param1)``
-> table of shape (N, 8 + H) for N = len(levels) - 1 steps, consumed row by row
by ``pygen.sampler_step`` (see csrc/include/pygen/step.h for the columns).
Backends: torch reference (this file), Triton (kernels/schedule.py), C++ CPU
(csrc/cpu/schedule.cpp), CUDA (csrc/cuda/schedule.cu); all evaluate the
formulas of csrc/include/pygen/step.h (``coefficient_row``) in float64.

``levels`` per kind:
    ddim, ddpm                 alphas_cumprod at each step's timestep, then the
                               final one (alphas_cumprod[0] or 1.0)
    euler, euler_ancestral,    sigmas, k-diffusion style (decreasing, usually
    dpmpp_2m                   ending in 0); the model is a denoiser (x0) or eps
    euler_maruyama_vp/_ve      times t_0 > t_1 > ... of the reverse SDE; the
                               model gives the score (or eps = -std(t)·score)
"""
import math

import torch

from pygen import _backend
from pygen.ops._common import check_tensor

__all__ = ["step_coefficients", "KINDS", "PREDICTIONS"]

KINDS = {
    "ddim": 0,
    "ddpm": 1,
    "euler": 2,
    "euler_ancestral": 3,
    "dpmpp_2m": 4,
    "euler_maruyama_vp": 5,
    "euler_maruyama_ve": 6,
}
PREDICTIONS = {"eps": 0, "epsilon": 0, "sample": 1, "x0": 1, "score": 1, "v": 2, "v_prediction": 2}
_VALID_PREDICTIONS = {
    0: ("eps", "epsilon", "sample", "x0", "v", "v_prediction"),
    1: ("eps", "epsilon", "sample", "x0", "v", "v_prediction"),
    2: ("eps", "epsilon", "x0", "sample"),
    3: ("eps", "epsilon", "x0", "sample"),
    4: ("eps", "epsilon", "x0", "sample"),
    5: ("eps", "epsilon", "score"),
    6: ("eps", "epsilon", "score"),
}
COL_CX, COL_CM, COL_A, COL_B, COL_S, COL_HX, COL_HD, COL_SLOT, COL_HIST = range(9)


def history_width(kind):
    return 1 if kind == KINDS["dpmpp_2m"] else 0


def table_width(kind):
    return COL_HIST + history_width(kind)


# ---------------------------------------------------------------------------
# torch reference (float64, vectorised over steps)
# ---------------------------------------------------------------------------
def step_coefficients_reference(levels, kind, prediction, eta, param0, param1):
    lv = levels.to(torch.float64)
    n = lv.shape[0] - 1
    out_dtype = torch.float64 if levels.dtype == torch.float64 else torch.float32
    cols = torch.zeros(n, table_width(kind), dtype=torch.float64, device=levels.device)
    cols[:, COL_SLOT] = -1.0
    l0, l1 = lv[:-1], lv[1:]
    nan = float("nan")
    if kind in (0, 1):
        at, ap = l0, l1
        sat, s1at = at.sqrt(), (1 - at).sqrt()
        if prediction == 0:
            cols[:, COL_CX], cols[:, COL_CM] = 1 / sat, -s1at / sat
        elif prediction == 1:
            cols[:, COL_CM] = 1.0
        elif prediction == 2:
            cols[:, COL_CX], cols[:, COL_CM] = sat, -s1at
        else:
            cols[:, COL_CX] = cols[:, COL_CM] = nan
        if kind == 0:
            var = (1 - ap) / (1 - at) * (1 - at / ap)
            std = eta * var.sqrt()
            direction = (1 - ap - std * std).sqrt()
            cols[:, COL_A] = direction / s1at
            cols[:, COL_B] = ap.sqrt() - direction * sat / s1at
            cols[:, COL_S] = std
        else:
            cur_alpha = at / ap
            cur_beta = 1 - cur_alpha
            cols[:, COL_A] = cur_alpha.sqrt() * (1 - ap) / (1 - at)
            cols[:, COL_B] = ap.sqrt() * cur_beta / (1 - at)
            var = ((1 - ap) / (1 - at) * cur_beta).clamp(min=1e-20)
            std = var.sqrt()
            if n > 0 and bool(ap[-1] >= 1.0):
                std[-1] = 0.0
            cols[:, COL_S] = std
    elif kind in (2, 3, 4):
        sig, sn = l0, l1
        if prediction == 1:
            cols[:, COL_CM] = 1.0
        elif prediction == 0:
            cols[:, COL_CX], cols[:, COL_CM] = 1.0, -sig
        else:
            cols[:, COL_CX] = cols[:, COL_CM] = nan
        if kind == 2:
            cols[:, COL_A] = sn / sig
            cols[:, COL_B] = 1 - sn / sig
        elif kind == 3:
            up = torch.minimum(sn, eta * (sn**2 * (sig**2 - sn**2) / sig**2).sqrt())
            down = (sn**2 - up**2).sqrt()
            cols[:, COL_A] = down / sig
            cols[:, COL_B] = 1 - down / sig
            cols[:, COL_S] = up
        else:
            cols[:, COL_HD] = 1.0
            cols[:, COL_SLOT] = 0.0
            h = sig.log() - sn.log()
            em1 = torch.expm1(-h)
            a = sn / sig
            b = -em1
            hist = torch.zeros_like(sig)
            if n > 1:
                h_last = lv[:-2].log() - sig[1:].log()
                r = h_last / h[1:]
                b[1:] = -em1[1:] * (1 + 1 / (2 * r))
                hist[1:] = em1[1:] / (2 * r)
            last = sn == 0
            a = torch.where(last, torch.zeros_like(a), a)
            b = torch.where(last, torch.ones_like(b), b)
            hist = torch.where(last, torch.zeros_like(hist), hist)
            cols[:, COL_A], cols[:, COL_B], cols[:, COL_HIST] = a, b, hist
    elif kind in (5, 6):
        t, dt = l0, l1 - l0
        if kind == 5:
            beta = param0 + t * (param1 - param0)
            f, g2 = -0.5 * beta, beta
            log_mean = -0.25 * t * t * (param1 - param0) - 0.5 * t * param0
            std = (-torch.expm1(2 * log_mean)).sqrt()
        else:
            sigma = param0 * (param1 / param0) ** t
            f, g2 = torch.zeros_like(t), sigma * sigma * 2 * math.log(param1 / param0)
            std = sigma
        if prediction == 1:
            cols[:, COL_CM] = 1.0
        elif prediction == 0:
            cols[:, COL_CM] = -1 / std
        else:
            cols[:, COL_CM] = nan
        cols[:, COL_A] = 1 + f * dt
        cols[:, COL_B] = -g2 * dt
        cols[:, COL_S] = (g2 * dt.abs()).sqrt()
    else:
        cols[:, :COL_HIST] = nan
    return cols.to(out_dtype)


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------
def step_coefficients(levels, kind, *, prediction="eps", eta=0.0, beta_min=0.1, beta_max=20.0,
                      sigma_min=0.01, sigma_max=50.0):
    """Per-step coefficient table of a sampler, computed on ``levels.device`` in one launch.

    Args:
        levels: 1-D float tensor of N+1 noise levels (see the module docstring
            for what each kind expects); gives N steps.
        kind: one of ``KINDS`` ("ddim", "ddpm", "euler", "euler_ancestral",
            "dpmpp_2m", "euler_maruyama_vp", "euler_maruyama_ve").
        prediction: what the model returns: "eps", "x0"/"sample", "v" (ddim,
            ddpm), or "score" (euler_maruyama_*).
        eta: DDIM eta / ancestral eta (0 = deterministic).
        beta_min, beta_max: VP SDE (euler_maruyama_vp); sigma_min, sigma_max: VE SDE.

    Returns a (N, 8 + H) table: float64 when ``levels`` is float64, else float32.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    k = KINDS[kind]
    if prediction not in _VALID_PREDICTIONS[k]:
        raise ValueError(f"prediction for kind {kind!r} must be one of {_VALID_PREDICTIONS[k]}, got {prediction!r}")
    check_tensor("levels", levels, dtypes=(torch.float32, torch.float64))
    if levels.dim() != 1 or levels.shape[0] < 2:
        raise ValueError(f"levels must be 1-D with at least 2 entries (N+1 for N steps), got shape {tuple(levels.shape)}")
    if not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    p0, p1 = (beta_min, beta_max) if k == 5 else (sigma_min, sigma_max)
    if k == 5 and not (0 <= beta_min <= beta_max):
        raise ValueError(f"beta_min/beta_max must satisfy 0 <= beta_min <= beta_max, got {beta_min}, {beta_max}")
    if k == 6 and not (0 < sigma_min < sigma_max):
        raise ValueError(f"sigma_min/sigma_max must satisfy 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    levels = levels.contiguous()
    backend = _backend.resolve(levels.device)
    args = (levels, k, PREDICTIONS[prediction], float(eta), float(p0), float(p1))
    if backend == "torch":
        return step_coefficients_reference(*args)
    if backend == "triton":
        from pygen.kernels import schedule as tk

        return tk.step_coefficients(*args)
    return torch.ops.pygen.step_coefficients(*args)


# ---------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------
def _fake(levels, kind, prediction, eta, param0, param1):
    dtype = torch.float64 if levels.dtype == torch.float64 else torch.float32
    return levels.new_empty((levels.shape[0] - 1, table_width(kind)), dtype=dtype)


def _register():
    from pygen.ops import _registry

    def triton_impl(levels, kind, prediction, eta, param0, param1):
        from pygen.kernels import schedule as tk

        return tk.step_coefficients(levels, kind, prediction, eta, param0, param1)

    _registry.register_reference("step_coefficients", step_coefficients_reference)
    _registry.register_triton("step_coefficients", triton_impl)
    _registry.register_fake("step_coefficients", _fake)


_register()
