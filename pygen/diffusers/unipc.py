"""Fused ``UniPCMultistepScheduler`` (diffusers namesake): one fused launch per ``step()``.

Backends: whatever pygen resolves for the sample's device (torch reference, C++ CPU, Triton,
CUDA) through the general fused step ``torch.ops.pygen.sampler_step_out``.

The math. With D_k the converted model output of step k (x0 when ``predict_x0``, eps
otherwise) and x_k the sample given to step k, diffusers' step i does

    D_i     = cx·x_i + cm·model_output                        # convert_model_output
    X_i     = C_i(X_{i-1}; D_i, D_{i-1}, ..., D_{i-q})        # UniC corrector (q = previous order)
    x_{i+1} = P_i(X_i;     D_i, D_{i-1}, ..., D_{i-p+1})      # UniP predictor (p = this order)

(X_i = x_i when the corrector is off: first step, ``disable_corrector``). C_i and P_i are
linear, and the coefficient of X in C_i and in P_{i-1} is the same (both step from sigma
index i-1 to i), as is their coefficient of D_{i-1}. So, with ``out_{i-1}`` = P_{i-1}(X_{i-1}; ...)
the previous ``prev_sample`` this scheduler returned,

    X_i = out_{i-1} + (C_i - P_{i-1})(D_i, D_{i-1}, ..., D_{i-q})   # no X_{i-1} term left

and the whole step is one row of the fused step (csrc/include/pygen/step.h):

    d = cx·x + cm·model_output                 # = D_i
    x_next = a·x + b·d + s·z + Σ_j hist_j·h_j  # z = out_{i-1} (the step's explicit "noise"
                                               #   input: UniPC draws no noise), h = D ring
    h[i % order] = d                           # D_i joins the ring

Why not the other layouts. The fused step writes one history slot per launch, as
``hx·x + hd·d`` only; stock diffusers carries the corrected sample X_i, which depends on
X_{i-1} (history), so it can never be written by that slot, and writing D_i through
``pred_x0`` as a view of a history slot (option a/c of the brief) still leaves X_i
unwritable. Two launches (corrector, then predictor) would be exact but read and write
about twice the memory. The identity above needs no stored X at all: what the next step
needs is ``out_{i-1}``, a tensor this class computed itself. It keeps its own copy of it
(for float32/float64 samples ``prev_sample`` is a clone of the kept tensor; for
float16/bfloat16 the kept tensor is the float32 result and ``prev_sample`` its cast), so a
caller that edits ``prev_sample`` in place, or passes a different sample to the next step
(inpainting pipelines blend latents between steps), gets exactly what stock gives: stock's
corrector also ignores the sample passed in except through its model output. No tensor
aliasing is involved (the ring slot the step writes may be read in the same launch, which
every backend supports: per element all history reads happen before the slot write).

Orders: the order of step i depends on i (``lower_order_final``: min(order, n - i), no
15-step condition in UniPC) and on ``lower_order_nums`` (steps since ``set_timesteps``,
a host counter); the corrector's order is the previous step's order. So ``set_timesteps``
builds ``solver_order + 1`` tables (one per ``lower_order_nums``), ``step()`` picks the
table on the host and the row on the device (no sync). Whether the corrector runs (step
index > 0, ``i - 1`` not in ``disable_corrector``) is baked into the row; "a previous step
exists" is the host counter.

State exposed as in diffusers:
- ``lower_order_nums`` (same counter) and ``timestep_list``.
- ``last_sample``: not None after the first step, as stock; it holds the sample given to the
  last step, not the corrected sample, which this class never materialises.
- ``model_outputs``: ``solver_order`` entries, oldest first, ``None`` until filled: the converted
  model outputs D_k (x0 when ``predict_x0``, thresholded when ``thresholding``; eps otherwise)
  in the dtype stock gives them (the model output's for ``sample``-to-x0 and eps-to-eps, else
  the promotion of sample and model output). The fused step writes D_i as its ``pred_x0``
  output (float32 for float16/bfloat16 samples, cast to stock's dtype when ``model_outputs`` is
  read, so the loop launches nothing more). The list mirrors the step's history ring and is
  read-only: assigning to it or to its entries does not change what later steps use, as
  DPM-Solver's.
- ``this_order``: the order of the last predictor step, as stock, whenever the host knows it
  without a device read: always with ``lower_order_final=False`` (it depends on
  ``lower_order_nums`` only), else when the run's first step index is known on the host
  (``begin_index``, or a first ``timestep`` that is a Python number, a CPU tensor or an element
  of ``self.timesteps``: what pipelines pass) and every step since took one scalar timestep in
  eager mode. Otherwise (first index found on the device, per-row timesteps, steps under
  torch.compile) it is ``None``: it would need the device step index.

Per-row timesteps (a 1-D ``timestep``, one entry per batch row) are supported with the rule of
the other multistep classes: every row must have gone through the same number of ``step()``
calls since ``set_timesteps``; the rows may sit at different step indices.

Not fused:
- ``thresholding=True`` (with ``predict_x0``): the per-row quantile of the predicted x0 is
  computed with device torch ops (no host sync), then the fused step consumes it.
- ``solver_p`` (another scheduler as predictor): the stock ``step()`` is used for the whole run.

Numerics: computed in float32 (float64 for float64 samples); coefficients in float64 from
diffusers' float32 lambdas. ``prev_sample`` has the sample's dtype, as stock. A float16/bfloat16
sample with a model output of the same dtype (no thresholding) is read and written by the kernel
directly, with the history ring and D_i in float32 and the kept previous output in the sample's
dtype (stock computes the whole step in that dtype): one launch plus the copy of ``prev_sample``
(four device ops when upcasting first).
"""
import math

import diffusers
import numpy as np
import torch
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from pygen.diffusers._base import FusedSchedulerMixin, OrderTablesMixin, as_dtype, fast_output, half_io
from pygen.diffusers.dpmsolver import _alpha_sigma_lambda
from pygen.ops.schedule import COL_A, COL_B, COL_CM, COL_CX, COL_HD, COL_HIST, COL_S, COL_SLOT
from pygen.samplers.program import check_model_out

__all__ = ["UniPCMultistepScheduler"]

_PREDICTIONS = ("epsilon", "sample", "v_prediction", "flow_prediction")


class _Schedule:
    """alpha_t, sigma_t, lambda_t per sigma index (float32 as diffusers, then float64), python indexing."""

    def __init__(self, sigmas, flow):
        self.alpha, self.sig_t, _, self.lam32 = _alpha_sigma_lambda(sigmas, flow)
        self.sigma = sigmas.detach().to("cpu", torch.float32).double().tolist()

    def dlam(self, j, k):
        """lambda_j - lambda_k as diffusers computes it (float32 difference)."""
        return float(self.lam32[j] - self.lam32[k])


def _uni_update(sch, t, s0, order, predict_x0, bh1, corrector):
    """One UniP (predictor) or UniC (corrector) update from sigma index s0 to t.

    Returns (A, coeffs): the update is A·X + Σ_j coeffs[j]·D_j (j absolute step indices; the
    corrector's "current" model output is D_t). The predictor of order p uses D_{s0..s0-p+1},
    the corrector of order p uses D_t and D_{s0..s0-p+1}."""
    h = sch.dlam(t, s0)
    if predict_x0:
        A, K = sch.sig_t[t] / sch.sig_t[s0], sch.alpha[t]
        hh = -h
    else:
        A, K = sch.alpha[t] / sch.alpha[s0], sch.sig_t[t]
        hh = h
    h_phi_1 = math.expm1(hh)
    B_h = hh if bh1 else math.expm1(hh)
    rks = [sch.dlam(s0 - k, s0) / h for k in range(1, order)]
    coeffs = {s0: -K * h_phi_1}
    if corrector:
        nb = order
    else:
        nb = order - 1
    if nb > 0:
        # b_k = phi-type coefficients; the solve is over the first nb of them
        b, hpk, fact = [], h_phi_1 / hh - 1.0, 1.0
        for k in range(1, nb + 1):
            b.append(hpk * fact / B_h)
            fact *= k + 1
            hpk = hpk / hh - 1.0 / fact
        if not corrector and order == 2:
            rhos = [0.5]
        elif corrector and order == 1:
            rhos = [0.5]
        else:
            nodes = (rks + [1.0])[:nb]
            R = np.array([[r ** p for r in nodes] for p in range(nb)], dtype=np.float64)
            rhos = np.linalg.solve(R, np.array(b, dtype=np.float64)).tolist()
        # D1_k = (D_{s0-k} - D_{s0}) / rk_k, residual = Σ_k rho_k·D1_k (+ rho_last·(D_t - D_s0))
        for k in range(1, order):
            w = -K * B_h * rhos[k - 1] / rks[k - 1]
            coeffs[s0 - k] = coeffs.get(s0 - k, 0.0) + w
            coeffs[s0] += -w
        if corrector:
            w = -K * B_h * rhos[-1]
            coeffs[t] = coeffs.get(t, 0.0) + w
            coeffs[s0] += -w
    return A, coeffs


def _x0_coeffs(pred, sch, i):
    """(cx, cm): x0 = cx·x + cm·model_output at sigma index i."""
    alpha, sig_t = sch.alpha[i], sch.sig_t[i]
    if pred == "epsilon":
        return 1.0 / alpha, -sig_t / alpha
    if pred == "sample":
        return 0.0, 1.0
    if pred == "v_prediction":
        return alpha, -sig_t
    return 1.0, -sch.sigma[i]  # flow_prediction


def _eps_coeffs(pred, sch, i):
    """(cx, cm): eps = cx·x + cm·model_output at sigma index i."""
    alpha, sig_t = sch.alpha[i], sch.sig_t[i]
    if pred == "epsilon":
        return 0.0, 1.0
    if pred == "sample":
        return 1.0 / sig_t, -alpha / sig_t
    return sig_t, alpha  # v_prediction


def _safe(fn, *args):
    try:
        return fn(*args)
    except (ZeroDivisionError, ValueError, OverflowError, np.linalg.LinAlgError):
        return None  # diffusers gets inf/NaN there too


class UniPCMultistepScheduler(OrderTablesMixin, FusedSchedulerMixin, diffusers.UniPCMultistepScheduler):
    """diffusers' UniPCMultistepScheduler with a fused, sync-free ``step()`` (same config and API)."""

    _pygen_add_noise_kind = "alpha_sigma"
    _pygen_missing_timestep = "last"  # stock: a timestep not in self.timesteps is the last step

    # --- model_outputs: the converted outputs D_k, cast to stock's dtype when read ------
    @property
    def model_outputs(self):
        """The converted model outputs of the last ``solver_order`` steps, oldest first (as stock's)."""
        outs = self.__dict__.get("_pygen_mo")
        if outs is not None and self.__dict__.get("_pygen_mo_lazy"):
            for k, v in enumerate(outs):
                if type(v) is tuple:  # (float32 tensor the fused step wrote, stock's dtype)
                    outs[k] = as_dtype(*v)
            self._pygen_mo_lazy = False
        return outs

    @model_outputs.setter
    def model_outputs(self, value):  # (stock's __init__ and set_timesteps assign [None] * solver_order)
        self._pygen_mo = value
        self._pygen_mo_lazy = False

    # --- tables ------------------------------------------------------------------
    def _pygen_order_at(self, i, lower_order_nums):
        """this_order diffusers uses at step index i after ``lower_order_nums`` steps."""
        cfg, n = self.config, len(self.timesteps)
        order = int(cfg.solver_order)
        if cfg.lower_order_final:
            order = min(order, n - i)
        return max(1, min(order, lower_order_nums + 1))  # (diffusers asserts >= 1)

    def _pygen_rows(self):
        cfg = self.config
        pred = cfg.prediction_type
        predict_x0 = bool(self.predict_x0)
        bh1 = cfg.solver_type == "bh1"
        order = int(cfg.solver_order)
        n = len(self.timesteps)
        sch = _Schedule(self.sigmas, cfg.use_flow_sigmas)
        disabled = set(int(k) for k in (self.disable_corrector or []))
        self._pygen_bad_pred = pred not in _PREDICTIONS or (not predict_x0 and pred == "flow_prediction")
        width = COL_HIST + order
        pre = np.zeros((n, 2))  # numpy on the host: cheap element writes
        tables = np.zeros((order + 1, n, width))
        for i in range(n):
            if self._pygen_bad_pred:
                cx = cm = px = pm = math.nan
            else:
                px, pm = _x0_coeffs(pred, sch, i)
                if cfg.thresholding and predict_x0:
                    cx, cm = 0.0, 1.0  # the fused step's model input is the thresholded x0
                elif predict_x0:
                    cx, cm = px, pm
                else:
                    cx, cm = _eps_coeffs(pred, sch, i)
            pre[i, 0], pre[i, 1] = px, pm
            for lon in range(order + 1):
                row = tables[lon, i]
                row[COL_CX], row[COL_CM] = cx, cm
                row[COL_HD], row[COL_SLOT] = 1.0, float(i % order)
                p = self._pygen_order_at(i, lon)
                up = _safe(_uni_update, sch, i + 1, i, p, predict_x0, bh1, False)
                use_corr = lon >= 1 and i > 0 and (i - 1) not in disabled
                corr = None
                if use_corr:
                    q = self._pygen_order_at(i - 1, lon - 1) if lon < order else self._pygen_order_at(i - 1, order)
                    c = _safe(_uni_update, sch, i, i - 1, q, predict_x0, bh1, True)
                    p_prev = _safe(_uni_update, sch, i, i - 1, q, predict_x0, bh1, False)
                    if c is not None and p_prev is not None:
                        corr = {j: c[1].get(j, 0.0) - p_prev[1].get(j, 0.0) for j in set(c[1]) | set(p_prev[1])}
                if up is None or (use_corr and corr is None):
                    row[COL_A] = row[COL_B] = row[COL_S] = math.nan
                    continue
                A, dco = up
                if use_corr:  # X_i = z + Σ corr_j D_j, z = previous prev_sample
                    row[COL_S] = A
                    dco = dict(dco)
                    for j, w in corr.items():
                        dco[j] = dco.get(j, 0.0) + A * w
                else:  # X_i = x_i
                    row[COL_A] = A
                for j, w in dco.items():
                    if j == i:
                        row[COL_B] += w
                    elif w != 0.0 or math.isnan(w):
                        row[COL_HIST + j % order] += w
        self._pygen_all_tables = tables = torch.from_numpy(tables)
        self._pygen_pre64 = torch.from_numpy(pre)
        return tables[order]

    def _pygen_prepare(self):
        super()._pygen_prepare()
        self._pygen_last_out = None
        # column S carries z = the previous prev_sample, always passed explicitly (a row with S != 0
        # runs only after a first step): no in-kernel noise, so no Philox key is ever drawn
        self._pygen_noisy = False
        self._pygen_host_i = None  # the step index as the host knows it (None: only the device does)

    def _pygen_track_order(self, timestep, first, per_row, lon):
        """Set ``this_order`` as stock does when the host knows it (no device read); keeps the host's
        copy of the step index (``first``: whether this step found the device index afresh)."""
        if torch.compiler.is_compiling():  # a host counter read here would recompile at every step
            i = self._pygen_host_i = None
        elif per_row:
            i = self._pygen_host_i = None
        else:
            if first:
                self._pygen_host_i = (int(self.begin_index) if self.begin_index is not None
                                      else self._pygen_host_first(timestep))
            i = self._pygen_host_i
            if i is not None:
                self._pygen_host_i = i + 1
        if i is not None or not self.config.lower_order_final:
            self.this_order = self._pygen_order_at(0 if i is None else i, lon)
        else:
            self.this_order = None


    # --- step ----------------------------------------------------------------------
    def step(self, model_output, timestep, sample, return_dict=True):
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        if self.solver_p:
            return super().step(model_output, timestep, sample, return_dict=return_dict)
        cfg = self.config
        if not isinstance(model_output, torch.Tensor) or not isinstance(sample, torch.Tensor):
            raise TypeError("model_output and sample must be torch.Tensor")
        if self._pygen_bad_pred:
            if self.predict_x0:
                raise ValueError(f"prediction_type given as {cfg.prediction_type} must be one of `epsilon`, `sample`, "
                                 "`v_prediction`, or `flow_prediction` for the UniPCMultistepScheduler.")
            raise ValueError(f"prediction_type given as {cfg.prediction_type} must be one of `epsilon`, `sample`, or"
                             " `v_prediction` for the UniPCMultistepScheduler.")
        if not sample.is_floating_point():
            raise TypeError(f"sample must be a floating-point tensor, got {sample.dtype}")
        order = int(cfg.solver_order)
        lon = min(int(self.lower_order_nums), order)
        first = self._pygen_index is None
        idx = self._pygen_step_index(timestep, sample)
        compute = torch.float64 if sample.dtype == torch.float64 else torch.float32
        thresholded = cfg.thresholding and self.predict_x0
        # float16/bfloat16 sample and model output: the kernel reads and writes them directly (float32
        # arithmetic, history ring and D_i), one launch + the copy of prev_sample; the kept previous
        # output is then in the sample's dtype, as stock's whole fp16 computation is
        half = half_io(sample, model_output) and not thresholded
        if half:
            x = m = None
        else:
            x = sample.to(compute)
            m = model_output.to(compute) if model_output.is_floating_point() else model_output
            m = check_model_out(m, x, "model_output")
            if thresholded:
                m = self._pygen_threshold_x0(m, x, idx)
        like = sample if half else x
        z = self._pygen_last_out if self.last_sample is not None else None
        if z is not None and (z.shape != like.shape or z.device != like.device):
            raise ValueError(f"sample changed shape/device between steps ({tuple(z.shape)} {z.device} -> "
                             f"{tuple(like.shape)} {like.device}); call set_timesteps() to start a new run")
        if z is not None and z.dtype != like.dtype:  # the run switched between half and float32 inputs
            z = z.to(like.dtype)
        if half:
            out, pred = self._pygen_launch(model_output, sample, idx, z, pred_dtype=torch.float32,
                                           hist_dtype=torch.float32,
                                           table=self._pygen_dev_table(lon, sample.device, torch.float32))
        else:
            out, pred = self._pygen_fused(m, x, idx, z, lon)
        self._pygen_last_out = out
        self.last_sample = sample
        self._pygen_track_order(timestep, first, idx.numel() > 1, lon)
        # model_outputs in the dtype of stock's convert_model_output
        same = "sample" if self.predict_x0 else "epsilon"  # D is the model output itself
        if cfg.prediction_type == same:
            pred_dtype = model_output.dtype
        else:
            pred_dtype = torch.promote_types(sample.dtype, model_output.dtype)
        if pred.dtype != pred_dtype:  # cast when model_outputs is read: no launch in the loop
            pred = (pred, pred_dtype)
            self._pygen_mo_lazy = True
        if order > 1:
            self._pygen_mo = list(self._pygen_mo[1:]) + [pred]
            self.timestep_list = list(self.timestep_list[1:]) + [timestep]
        else:
            self._pygen_mo, self.timestep_list = [pred], [timestep]
        if self.lower_order_nums < order:
            self.lower_order_nums += 1
        # prev_sample must not alias the kept tensor (callers may edit it in place)
        prev = out.to(sample.dtype) if out.dtype != sample.dtype else out.clone()
        if not return_dict:
            return (prev,)
        return fast_output(SchedulerOutput, prev_sample=prev)

    def _pygen_fused(self, m, x, idx, z, lon):
        table = self._pygen_dev_table(lon, x.device, x.dtype)
        return self._pygen_launch(m, x, idx, z, table=table)  # (prev_sample, D_i)
