"""Fused ``LMSDiscreteScheduler`` (diffusers namesake): linear multistep in sigma.

diffusers keeps a list of derivatives ``(x - d)/sigma`` and, at step index k, adds
``Σ_j c_j·derivative_{k-j}`` with ``c_j`` = ∫_{sigma_k}^{sigma_{k+1}} of the Lagrange basis
polynomial of node ``sigma_{k-j}`` over ``sigma_k .. sigma_{k-p+1}``, ``p = min(k + 1, order)``
(integrated numerically with scipy). pygen integrates the same polynomials exactly
(pygen.kdiffusion ``linear_multistep_coeff``) at ``set_timesteps`` and keeps the previous
``order - 1`` derivatives in a device ring of history slots (slot = step index mod (order - 1)),
so row k of the fused step is::

    d       = pred_original_sample(x, sigma_k)
    x_next  = (1 + c_0/sigma_k)·x - c_0/sigma_k·d + Σ_{j>=1} c_j·h[(k - j) mod (order - 1)]
    h[k mod (order - 1)] = (x - d)/sigma_k

The ring starts at zero after ``set_timesteps``, so a run that starts mid-schedule
(``begin_index`` / img2img) sums only the derivatives it has, exactly like diffusers' truncated
``zip``. The table for the default ``step(order=4)`` is built at ``set_timesteps``; a call with
another ``order`` uses a second table (and its own ring of ``order - 1`` slots), built on first
use and cached per order. Use one ``order`` per run: diffusers shares one derivative list
between orders, pygen one ring per order, so switching ``order`` mid-run differs from stock.
Per-row timesteps are supported (each row's derivatives stay in its own slots; every row must
advance one step per call, as every pipeline does). ``self.derivatives`` stays an empty list (the
history lives on the device). Output dtypes as stock (no upcast: the promoted dtype of sample
and model_output; ``pred_original_sample`` in model_output's dtype for ``prediction_type="sample"``).
"""
import numbers
import warnings

import diffusers
import torch
from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteSchedulerOutput

from pygen.diffusers._base import FusedSchedulerMixin
from pygen.diffusers.euler import CInMixin, as_table, denoise_cols, empty_rows, host_sigmas
from pygen.kdiffusion import linear_multistep_coeff
from pygen.ops.schedule import COL_A, COL_B, COL_HD, COL_HIST, COL_HX, COL_SLOT

__all__ = ["LMSDiscreteScheduler"]

DEFAULT_ORDER = 4
MAX_ORDER = 9  # order - 1 history slots; the fused step keeps at most 8


def lms_rows(sigmas, order, prediction_type, scheduler_name):
    """(K, 8 + order - 1) float64 rows of LMS of the given order over sigmas (K steps + final)."""
    n = len(sigmas) - 1
    hw = order - 1
    rows = empty_rows(n, COL_HIST + hw)
    for k in range(n):
        row, s = rows[k], sigmas[k]
        denoise_cols(row, prediction_type, s, scheduler_name)
        cur = min(k + 1, order)
        try:
            c = [linear_multistep_coeff(cur, sigmas, k, j) for j in range(cur)]
        except ZeroDivisionError:  # repeated sigma nodes (e.g. the 1000-step schedule of leading +
            c = [float("nan")] * cur  # steps_offset): diffusers' integrand divides by zero there too
        row[COL_A], row[COL_B] = 1.0 + c[0] / s, -c[0] / s
        if hw:
            for j in range(1, cur):
                row[COL_HIST + (k - j) % hw] += c[j]
            row[COL_HX], row[COL_HD], row[COL_SLOT] = 1.0 / s, -1.0 / s, float(k % hw)
    return as_table(rows, COL_HIST + hw)


class LMSDiscreteScheduler(CInMixin, FusedSchedulerMixin, diffusers.LMSDiscreteScheduler):
    """diffusers' LMSDiscreteScheduler with a fused, sync-free ``step()`` (same config and API).

    See the module docstring for the history ring and ``step(order=...)``.
    """

    _pygen_add_noise_kind = "ve"

    def _pygen_rows(self):
        return self._pygen_order_rows(DEFAULT_ORDER)

    def _pygen_order_rows(self, order):
        return lms_rows(host_sigmas(self), order, self.config.prediction_type, type(self).__name__)

    def _pygen_prepare(self):
        super()._pygen_prepare()
        self._pygen_order = DEFAULT_ORDER
        self._pygen_order_tables = {DEFAULT_ORDER: self._pygen_table64}  # order -> float64 rows
        self._pygen_order_dev = {}       # (order, device, acc) -> rows there
        self._pygen_histories = {}       # order -> history ring

    def _pygen_table(self, device, dtype):
        order = self._pygen_order
        if order == DEFAULT_ORDER:
            return super()._pygen_table(device, dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        key = (order, device, acc)
        table = self._pygen_order_dev.get(key)
        if table is None:
            rows = self._pygen_order_tables.get(order)
            if rows is None:
                rows = self._pygen_order_tables[order] = self._pygen_order_rows(order)
            table = self._pygen_order_dev[key] = rows.to(device=device, dtype=acc)
        return table

    def scale_model_input(self, sample, timestep):
        out = self._pygen_scale(sample, timestep)
        self.is_scale_input_called = True
        return out

    def step(self, model_output, timestep, sample, order=4, return_dict=True):
        if isinstance(order, bool) or not isinstance(order, numbers.Integral) or not 1 <= order <= MAX_ORDER:
            raise ValueError(f"order must be an int in [1, {MAX_ORDER}], got {order!r}")
        if self.config.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type given as {self.config.prediction_type} must be one of `epsilon`, "
                             "or `v_prediction`")
        if not self.is_scale_input_called:
            warnings.warn("The `scale_model_input` function should be called before `step` to ensure correct "
                          "denoising. See `StableDiffusionPipeline` for a usage example.")
        idx = self._pygen_step_index(timestep, sample)
        dtype = torch.promote_types(sample.dtype, model_output.dtype)
        order = int(order)
        self._pygen_histories[self._pygen_order] = self._pygen_history
        self._pygen_order = order
        self._pygen_history = self._pygen_histories.get(order)
        prev, pred = self._pygen_launch(model_output.to(dtype), sample.to(dtype), idx, None)
        self._pygen_histories[order] = self._pygen_history
        if self.config.prediction_type == "sample":
            pred = pred.to(model_output.dtype)
        return self._pygen_output(LMSDiscreteSchedulerOutput, prev, pred, return_dict)
