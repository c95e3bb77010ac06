"""Fused ``DPMSolverMultistepScheduler`` (diffusers namesake): one fused launch per ``step()``.

Backends: whatever pygen resolves for the sample's device (torch reference, C++ CPU, Triton,
CUDA) through the general fused step ``torch.ops.pygen.sampler_step_out``.

Every update of DPM-Solver / DPM-Solver++ (ODE and SDE variants, orders 1-3, midpoint/heun) is
linear in the sample x, the current converted model output m0 and the previous ones m1, m2::

    m0     = cx·x + cm·model_output            # convert_model_output (x0 for "++", eps otherwise)
    x_next = a·x + b·m0 + c1·m1 + c2·m2 + s·z  # z: noise of the sde-* variants
    hist[slot] = m0                            # m0 becomes m1 (and later m2) of the next steps

so each step is one row of the fused step's coefficient table (csrc/include/pygen/step.h). The
previous outputs live in a ring of ``solver_order - 1`` history slots (slot ``i % (order-1)``
for the step at index i; order 1 needs none). The coefficients are computed at
``set_timesteps`` from diffusers' own sigma table (alpha_t, sigma_t and lambda in float32 as
diffusers computes them, the rest in float64).

Which order a step uses depends on the step index i (lower_order_final, euler_at_final,
final_sigmas_type) and on ``lower_order_nums`` (the number of steps taken since
``set_timesteps``, a host counter, saturating at ``solver_order``). So ``set_timesteps`` builds
one table per value of ``lower_order_nums`` (``solver_order + 1`` tables of one row per step
index), ``step()`` picks the table on the host (no sync) and the row on the device.

State exposed as in diffusers:
- ``lower_order_nums``: the same host counter.
- ``model_outputs``: a list of ``solver_order`` entries, oldest first, ``None`` until filled:
  the converted model outputs of the last steps (the tensors the fused step wrote). It mirrors
  what the fused step keeps in its own history buffer and is read-only: assigning to it or to
  its entries does not change what later steps use.

Per-row timesteps (a 1-D ``timestep``, one entry per batch row) are supported with one rule:
every row must have gone through the same number of ``step()`` calls since ``set_timesteps``
(as in a batch of img2img jobs with different strengths that start together); the rows may
sit at different step indices.

Not fused:
- ``thresholding=True``: the per-row quantile of the predicted x0 is computed with device torch
  ops (no host sync), then the fused step consumes the thresholded x0.
- ``variance_type="learned"/"learned_range"``: the first 3 channels of ``model_output`` are taken
  (a view), as diffusers does.
- ``algorithm_type="sde-dpmsolver"`` with ``solver_order=3``: diffusers has no third-order SDE
  update (its step fails there); this class raises a ValueError at that step.

Numerics: samples are computed in float32 (float64 for float64 samples, where diffusers
computes in float32), ``prev_sample`` has the dtype diffusers returns. A float16/bfloat16
sample with a model output of the same dtype (ODE variants, no thresholding) is read and written
by the kernel directly, with the history ring in float32: one launch, no upcast copies; the
``model_outputs`` entries then have the sample's dtype, as diffusers'. Otherwise the sample and
model output are upcast to float32 first and prev_sample cast back.
"""
import math

import diffusers
import numpy as np
import torch
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from pygen.diffusers._base import FusedSchedulerMixin, OrderTablesMixin, as_dtype, fast_output, half_io
from pygen.ops.schedule import COL_A, COL_B, COL_CM, COL_CX, COL_HD, COL_HIST, COL_S, COL_SLOT
from pygen.samplers.program import check_model_out

__all__ = ["DPMSolverMultistepScheduler"]

_PLUS = ("dpmsolver++", "sde-dpmsolver++")
_SDE = ("sde-dpmsolver", "sde-dpmsolver++")


def _alpha_sigma_lambda(sigmas, flow):
    """alpha_t, sigma_t and lambda_t per sigma, in float32 as diffusers computes them; as float lists."""
    s = sigmas.detach().to("cpu", torch.float32)
    if flow:
        alpha, sig_t = 1 - s, s
    else:
        alpha = 1 / ((s ** 2 + 1) ** 0.5)
        sig_t = s * alpha
    lam = torch.log(alpha) - torch.log(sig_t)
    return alpha.double().tolist(), sig_t.double().tolist(), lam.tolist(), lam.numpy()  # float32 differences


def _x0_coeffs(prediction_type, alpha, sig_t, sigma):
    """(cx, cm) with x0 = cx·x + cm·model_output."""
    if prediction_type == "epsilon":
        return 1.0 / alpha, -sig_t / alpha
    if prediction_type == "sample":
        return 0.0, 1.0
    if prediction_type == "v_prediction":
        return alpha, -sig_t
    if prediction_type == "flow_prediction":
        return 1.0, -sigma
    return math.nan, math.nan


def _eps_coeffs(prediction_type, alpha, sig_t):
    """(cx, cm) with eps = cx·x + cm·model_output."""
    if prediction_type == "epsilon":
        return 0.0, 1.0
    if prediction_type == "sample":
        return 1.0 / sig_t, -alpha / sig_t
    if prediction_type == "v_prediction":
        return sig_t, alpha
    return math.nan, math.nan


def _update_coeffs(algo, solver_type, order, alpha_t, sig_t, sig_s0, alpha_s0, h, r0, r1):
    """(a, b0, b1, b2, s): x_next = a·x + b0·m0 + b1·m1 + b2·m2 + s·z for one DPM-Solver step.

    Written with D0 = m0, D1 = (m0 - m1)/r0 (second order) or diffusers' third-order D1, D2; k1
    and k2 are the coefficients of D1 and D2 (only computed for the orders that use them, so a
    zero-length first-order step stays finite)."""
    if algo == "dpmsolver++":
        a, phi1, s = sig_t / sig_s0, -alpha_t * math.expm1(-h), 0.0
    elif algo == "dpmsolver":
        a, phi1, s = alpha_t / alpha_s0, -sig_t * math.expm1(h), 0.0
    elif algo == "sde-dpmsolver++":
        a, phi1 = sig_t / sig_s0 * math.exp(-h), -alpha_t * math.expm1(-2.0 * h)
        s = sig_t * math.sqrt(-math.expm1(-2.0 * h))
    else:  # sde-dpmsolver
        a, phi1 = alpha_t / alpha_s0, -2.0 * sig_t * math.expm1(h)
        s = sig_t * math.sqrt(math.expm1(2.0 * h))
    if order == 1:
        return a, phi1, 0.0, 0.0, s

    def k_heun():
        if algo == "dpmsolver++":
            return alpha_t * (math.expm1(-h) / h + 1.0)
        if algo == "dpmsolver":
            return -sig_t * (math.expm1(h) / h - 1.0)
        if algo == "sde-dpmsolver++":
            return alpha_t * (math.expm1(-2.0 * h) / (2.0 * h) + 1.0)
        return -2.0 * sig_t * (math.expm1(h) / h - 1.0)

    if order == 2:
        if solver_type == "midpoint":
            k1 = 0.5 * phi1 if algo != "sde-dpmsolver" else -sig_t * math.expm1(h)
        else:
            k1 = k_heun()
        return a, phi1 + k1 / r0, -k1 / r0, 0.0, s
    if algo == "dpmsolver++":
        k2 = -alpha_t * ((math.expm1(-h) + h) / (h * h) - 0.5)
    elif algo == "dpmsolver":
        k2 = -sig_t * ((math.expm1(h) - h) / (h * h) - 0.5)
    elif algo == "sde-dpmsolver++":
        k2 = alpha_t * ((-math.expm1(-2.0 * h) - 2.0 * h) / (4.0 * h * h) - 0.5)
    else:
        k2 = math.nan  # diffusers has no third-order sde-dpmsolver update
    # third order: D1_0 = (m0 - m1)/r0, D1_1 = (m1 - m2)/r1,
    # D1 = D1_0 + r0/(r0 + r1)·(D1_0 - D1_1), D2 = (D1_0 - D1_1)/(r0 + r1)
    d10 = (1.0 / r0, -1.0 / r0, 0.0)
    d11 = (0.0, 1.0 / r1, -1.0 / r1)
    q = r0 / (r0 + r1)
    d1 = [u + q * (u - v) for u, v in zip(d10, d11)]
    d2 = [(u - v) / (r0 + r1) for u, v in zip(d10, d11)]
    k1 = k_heun()
    b = [k1 * d1[j] + k2 * d2[j] for j in range(3)]
    return a, phi1 + b[0], b[1], b[2], s


class DPMSolverMultistepScheduler(OrderTablesMixin, FusedSchedulerMixin, diffusers.DPMSolverMultistepScheduler):
    """diffusers' DPMSolverMultistepScheduler with a fused, sync-free ``step()`` (same config and API)."""

    _pygen_add_noise_kind = "alpha_sigma"
    _pygen_missing_timestep = "last"  # stock: a timestep not in self.timesteps is the last step

    # --- tables ------------------------------------------------------------------
    def _pygen_order_at(self, i, lower_order_nums):
        """The order diffusers uses at step index i after ``lower_order_nums`` steps."""
        cfg, n = self.config, len(self.timesteps)
        final = i == n - 1 and (cfg.euler_at_final or (cfg.lower_order_final and n < 15)
                                or cfg.final_sigmas_type == "zero")
        second = i == n - 2 and cfg.lower_order_final and n < 15
        if cfg.solver_order == 1 or lower_order_nums < 1 or final:
            return 1
        if cfg.solver_order == 2 or lower_order_nums < 2 or second:
            return 2
        return 3

    def _pygen_rows(self):
        cfg = self.config
        algo, pred = cfg.algorithm_type, cfg.prediction_type
        order = int(cfg.solver_order)
        n = len(self.timesteps)
        sig = self.sigmas.detach().to("cpu", torch.float32)
        sigf = sig.double().tolist()
        alpha, sig_t, lam, lam32 = _alpha_sigma_lambda(sig, cfg.use_flow_sigmas)
        num_hist = order - 1
        width = COL_HIST + num_hist
        self._pygen_bad_pred = (pred not in ("epsilon", "sample", "v_prediction", "flow_prediction")
                                or (algo not in _PLUS and pred == "flow_prediction"))
        # x0 = px·x + pm·model_output (used when thresholding: x0 is thresholded, then converted)
        pre = np.zeros((n, 2))  # numpy on the host: cheap element writes
        tables = np.zeros((order + 1, n, width))
        for i in range(n):
            px, pm = _x0_coeffs(pred, alpha[i], sig_t[i], sigf[i])
            pre[i, 0], pre[i, 1] = px, pm
            if cfg.thresholding:  # model input of the fused step is the thresholded x0
                cx, cm = (0.0, 1.0) if algo in _PLUS else (1.0 / sig_t[i], -alpha[i] / sig_t[i])
            elif algo in _PLUS:
                cx, cm = px, pm
            else:
                cx, cm = _eps_coeffs(pred, alpha[i], sig_t[i])
            # h and the step ratios, from diffusers' float32 lambdas (python indexing as diffusers)
            h = float(lam32[i + 1] - lam32[i])
            h0 = float(lam32[i] - lam32[i - 1])
            h1 = float(lam32[i - 1] - lam32[i - 2])
            for lon in range(order + 1):
                p = self._pygen_order_at(i, lon)
                r0 = h0 / h if p >= 2 else 0.0
                r1 = h1 / h if p >= 3 else 0.0
                try:
                    a, b0, b1, b2, s = _update_coeffs(algo, cfg.solver_type, p, alpha[i + 1], sig_t[i + 1], sig_t[i],
                                                      alpha[i], h, r0, r1)
                except (ZeroDivisionError, ValueError, OverflowError):  # diffusers gets inf/NaN there too
                    a = b0 = b1 = b2 = s = math.nan
                row = tables[lon, i]
                row[COL_CX], row[COL_CM], row[COL_A], row[COL_B], row[COL_S] = cx, cm, a, b0, s
                row[COL_SLOT] = -1.0
                if num_hist:
                    slot, prev1, prev2 = i % num_hist, (i - 1) % num_hist, (i - 2) % num_hist
                    row[COL_HD], row[COL_SLOT] = 1.0, float(slot)
                    if b1:
                        row[COL_HIST + prev1] += b1
                    if b2:
                        row[COL_HIST + prev2] += b2
        self._pygen_all_tables = tables = torch.from_numpy(tables)
        self._pygen_pre64 = torch.from_numpy(pre)
        return tables[order]

    # --- step ----------------------------------------------------------------------
    def step(self, model_output, timestep, sample, generator=None, variance_noise=None, return_dict=True):
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        cfg = self.config
        if not isinstance(model_output, torch.Tensor) or not isinstance(sample, torch.Tensor):
            raise TypeError("model_output and sample must be torch.Tensor")
        if self._pygen_bad_pred:
            raise ValueError(f"prediction_type given as {cfg.prediction_type} must be one of `epsilon`, `sample`, "
                             f"`v_prediction`" + (", or `flow_prediction`" if cfg.algorithm_type in _PLUS else "")
                             + " for the DPMSolverMultistepScheduler.")
        order = int(cfg.solver_order)
        lon = min(int(self.lower_order_nums), order)
        if cfg.algorithm_type == "sde-dpmsolver" and order == 3 and lon >= 2:
            raise ValueError("algorithm_type 'sde-dpmsolver' has no third-order update in diffusers; "
                             "use solver_order <= 2 or algorithm_type 'sde-dpmsolver++'")
        if cfg.variance_type in ("learned", "learned_range") and cfg.prediction_type == "epsilon":
            model_output = model_output[:, :3]
        # dtype diffusers returns: that of the converted model output
        if cfg.prediction_type == "sample" or (cfg.algorithm_type not in _PLUS and cfg.prediction_type == "epsilon"
                                                and not cfg.thresholding):
            out_dtype = model_output.dtype
        else:
            out_dtype = torch.promote_types(sample.dtype, model_output.dtype)
        idx = self._pygen_step_index(timestep, sample)
        compute = torch.float64 if sample.dtype == torch.float64 else torch.float32
        if (half_io(sample, model_output) and out_dtype == sample.dtype and not cfg.thresholding
                and cfg.algorithm_type not in _SDE):
            # one launch: the kernel reads the half sample and model output, computes in float32 and
            # keeps its history ring (the converted model outputs) in float32; model_outputs (the
            # attribute) are in the sample's dtype, as diffusers' are (_pygen_launch checks model_output)
            prev, pred = self._pygen_launch(model_output, sample, idx, None, hist_dtype=compute,
                                            table=self._pygen_dev_table(lon, sample.device, compute))
            return self._pygen_finish(prev, pred, order, return_dict)
        x = sample.to(compute)
        m = model_output.to(compute)
        check_model_out(m, x, "model_output")
        if cfg.thresholding:
            m = self._pygen_threshold_x0(m, x, idx)
        noise = None
        if cfg.algorithm_type in _SDE:
            mode = self._pygen_noise_mode()
            if variance_noise is not None:  # diffusers: variance_noise wins over generator
                noise = variance_noise.to(device=model_output.device, dtype=torch.float32)
            elif mode == "generator" or (mode == "auto" and generator is not None):
                from diffusers.utils.torch_utils import randn_tensor

                noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                     dtype=torch.float32)
            if noise is not None:
                noise = check_model_out(noise.to(compute), x, "variance_noise")
        prev, pred = self._pygen_fused(m, x, idx, noise, lon)
        return self._pygen_finish(as_dtype(prev, out_dtype), pred, order, return_dict)

    def _pygen_finish(self, prev, pred, order, return_dict):
        self.model_outputs = list(self.model_outputs[1:]) + [pred] if order > 1 else [pred]
        if self.lower_order_nums < order:
            self.lower_order_nums += 1
        if not return_dict:
            return (prev,)
        return fast_output(SchedulerOutput, prev_sample=prev)

    def _pygen_fused(self, m, x, idx, noise, lon):
        return self._pygen_launch(m, x, idx, noise, table=self._pygen_dev_table(lon, x.device, x.dtype))
