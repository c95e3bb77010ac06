"""Fused ``HeunDiscreteScheduler`` (diffusers namesake): Heun's 2nd-order method in sigma space.

diffusers runs each timestep with two ``step()`` calls (``sigmas`` and ``timesteps`` are
repeated by ``set_timesteps``): a first-order (Euler) call that keeps ``prev_derivative``,
``dt`` and ``sample``, then a correction call that averages the two derivatives. pygen folds
both into fused rows with one history slot (as pygen.kdiffusion ``_plan_heun``), one row per
``step()`` call, the device step index advancing per call:

    first-order row at index k (sigma = sigmas[k], next = sigmas[k+1], dt = next - sigma):
        d = pred_original_sample(x, sigma)
        x_next = x + (x - d)/sigma·dt,        h = x + (x - d)/sigma·dt/2
    second-order row at index k (sigma = sigmas[k-1], next = sigmas[k], dt = next - sigma):
        d = pred_original_sample(x, next)
        x_next = h + (x - d)/next·dt/2

Which of the two a call is (``state_in_first_order``) is a host flag toggled by every
``step()`` — exactly diffusers' rule (``dt is None``), with no device read — and it selects
one of two device tables (first-order rows / second-order rows, both indexed by the device
step index), so any ``begin_index`` behaves as in diffusers. ``scheduler.order == 2`` and
``state_in_first_order`` read as in diffusers; ``dt`` reads as None in the first-order state,
else as a device tensor holding diffusers' ``dt`` (no sync). ``prev_derivative`` and
``sample`` are not kept (the history lives in the fused step's device buffer): they read None.
``clip_sample`` clamps the predicted sample in the kernel. Output dtypes as stock (no upcast:
the promoted dtype of sample and model_output; ``pred_original_sample`` in model_output's dtype
for ``prediction_type="sample"``). Per-row timesteps are supported when all rows are in the
same phase (every pipeline: the phase follows the number of ``step()`` calls).
"""
import diffusers
import torch
from diffusers.schedulers.scheduling_heun_discrete import HeunDiscreteSchedulerOutput

from pygen.diffusers._base import FusedSchedulerMixin
from pygen.diffusers.euler import CInMixin, as_table, denoise_cols, empty_rows, host_sigmas
from pygen.ops.schedule import COL_A, COL_B, COL_HD, COL_HIST, COL_HX, COL_SLOT

__all__ = ["HeunDiscreteScheduler"]


def heun_rows(sigmas, prediction_type, scheduler_name):
    """(2K, 9) float64: K first-order rows, then K second-order rows (K = len(sigmas) - 1)."""
    k_rows = len(sigmas) - 1
    nan = float("nan")
    rows = empty_rows(2 * k_rows, COL_HIST + 1)
    for k in range(k_rows):
        first, second = rows[k], rows[k_rows + k]
        s, sn = sigmas[k], sigmas[k + 1]
        dt = sn - s
        denoise_cols(first, prediction_type, s, scheduler_name)
        first[COL_A], first[COL_B] = 1.0 + dt / s, -dt / s
        first[COL_HX], first[COL_HD], first[COL_SLOT] = 1.0 + 0.5 * dt / s, -0.5 * dt / s, 0.0
        s, sn = (sigmas[k - 1], sigmas[k]) if k >= 1 else (0.0, sigmas[0])
        if s == 0.0 or sn == 0.0:  # never reached by a pipeline (diffusers divides by zero there)
            second[:] = [nan] * len(second)
            second[COL_SLOT] = -1.0
            continue
        dt = sn - s
        denoise_cols(second, prediction_type, sn, scheduler_name)
        second[COL_A], second[COL_B], second[COL_HIST] = 0.5 * dt / sn, -0.5 * dt / sn, 1.0
    return as_table(rows, COL_HIST + 1)


class HeunDiscreteScheduler(CInMixin, FusedSchedulerMixin, diffusers.HeunDiscreteScheduler):
    """diffusers' HeunDiscreteScheduler with a fused, sync-free ``step()`` (same config and API).

    See the module docstring for how the two calls per timestep are folded.
    """

    _pygen_add_noise_kind = "ve"

    # --- diffusers' two-call state, kept on the host -------------------------
    @property
    def state_in_first_order(self):
        return getattr(self, "_pygen_first", True)

    @property
    def dt(self):
        if self.state_in_first_order:
            return None
        idx = getattr(self, "_pygen_index", None)
        if idx is None:
            return None
        tab = self._pygen_dt.get(idx.device)
        if tab is None:
            tab = self._pygen_dt[idx.device] = self._pygen_dt64.to(idx.device, torch.float32)
        return tab.index_select(0, (idx - 1).clamp(0, tab.shape[0] - 1))

    @dt.setter
    def dt(self, value):  # diffusers' set_timesteps resets it to None
        if value is not None:
            raise AttributeError("HeunDiscreteScheduler.dt is kept by pygen's fused step")
        self._pygen_first = True

    def _pygen_rows(self):
        sig = host_sigmas(self)
        self._pygen_dt64 = torch.tensor([b - a for a, b in zip(sig[:-1], sig[1:])], dtype=torch.float64)
        self._pygen_dt = {}
        return heun_rows(sig, self.config.prediction_type, type(self).__name__)

    def _pygen_prepare(self):
        super()._pygen_prepare()
        self._pygen_first = True
        self.prev_derivative = None
        self.sample = None

    def _pygen_table(self, device, dtype):
        full = super()._pygen_table(device, dtype)
        k_rows = full.shape[0] // 2
        return full[:k_rows] if self._pygen_first else full[k_rows:]

    def scale_model_input(self, sample, timestep):
        return self._pygen_scale(sample, timestep)

    def step(self, model_output, timestep, sample, return_dict=True):
        if self.config.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type given as {self.config.prediction_type} must be one of `epsilon`, "
                             "or `v_prediction`")
        idx = self._pygen_step_index(timestep, sample)
        dtype = torch.promote_types(sample.dtype, model_output.dtype)
        clamp = float(self.config.clip_sample_range) if self.config.clip_sample else 0.0
        prev, pred = self._pygen_launch(model_output.to(dtype), sample.to(dtype), idx, None, clamp=clamp)
        self._pygen_first = not self._pygen_first
        if self.config.prediction_type == "sample":
            pred = pred.to(model_output.dtype)
        return self._pygen_output(HeunDiscreteSchedulerOutput, prev, pred, return_dict)
