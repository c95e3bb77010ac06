"""Fused ``EulerAncestralDiscreteScheduler`` (diffusers namesake) in sigma space.

Row i (columns of csrc/include/pygen/step.h), sigma = sigmas[i], next = sigmas[i+1]::

    sigma_up   = sqrt(next²·(sigma² - next²)/sigma²),  sigma_down = sqrt(next² - sigma_up²)
    d          = cx·x + cm·model_output     # epsilon x - sigma·eps; v_prediction as Euler
    x_next     = (sigma_down/sigma)·x + (1 - sigma_down/sigma)·d + sigma_up·z

Noise ``z``: with a ``generator`` it is drawn exactly as diffusers draws it, at every step
(``randn_tensor(model_output.shape, dtype=model_output.dtype, generator=...)``, so seeded runs
reproduce stock diffusers and the generator advances the same way); without one it is drawn
in the fused kernel (Philox, stream = step index; see pygen.diffusers._base for the
``pygen_noise`` config switch). ``prediction_type="sample"`` raises NotImplementedError at
``step()`` as in diffusers. Output dtypes as stock: float32 math, ``prev_sample`` in
``model_output``'s dtype, ``pred_original_sample`` float32. Per-row timesteps supported.
"""
import math

import diffusers
import torch
from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput

from pygen.diffusers._base import FusedSchedulerMixin, as_dtype, half_io
from pygen.diffusers.euler import (_INT_TIMESTEP_MSG, _SCALE_MSG, CInMixin, compute_dtype, denoise_cols,
                                   as_table, empty_rows, host_sigmas, logger)
from pygen.ops.schedule import COL_A, COL_B, COL_S

__all__ = ["EulerAncestralDiscreteScheduler"]


def ancestral_rows(sigmas, prediction_type, scheduler_name):
    n = len(sigmas) - 1
    rows = empty_rows(n)
    for i in range(n):
        s, sn = sigmas[i], sigmas[i + 1]
        denoise_cols(rows[i], prediction_type, s, scheduler_name, allow_sample=False)
        up = math.sqrt(max(sn * sn * (s * s - sn * sn) / (s * s), 0.0))
        down = math.sqrt(max(sn * sn - up * up, 0.0))
        rows[i][COL_A] = down / s
        rows[i][COL_B] = 1.0 - down / s
        rows[i][COL_S] = up
    return as_table(rows)


class EulerAncestralDiscreteScheduler(CInMixin, FusedSchedulerMixin, diffusers.EulerAncestralDiscreteScheduler):
    """diffusers' EulerAncestralDiscreteScheduler with a fused, sync-free ``step()`` (same config and API)."""

    _pygen_add_noise_kind = "ve"

    def _pygen_rows(self):
        return ancestral_rows(host_sigmas(self), self.config.prediction_type, type(self).__name__)

    def scale_model_input(self, sample, timestep):
        out = self._pygen_scale(sample, timestep)
        self.is_scale_input_called = True
        return out

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError(_INT_TIMESTEP_MSG)
        if self.config.prediction_type == "sample":
            raise NotImplementedError("prediction_type not implemented yet: sample")
        if self.config.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type given as {self.config.prediction_type} must be one of `epsilon`, "
                             "or `v_prediction`")
        if not self.is_scale_input_called:
            logger.warning(_SCALE_MSG)
        idx = self._pygen_step_index(timestep, sample)
        noise = self._pygen_noise(model_output, generator)
        if half_io(sample, model_output) and (noise is None or noise.dtype == sample.dtype):
            prev, pred = self._pygen_launch(model_output, sample, idx, noise, pred_dtype=torch.float32)
            return self._pygen_output(EulerAncestralDiscreteSchedulerOutput, prev, pred, return_dict)
        compute = compute_dtype(sample, model_output)
        prev, pred = self._pygen_launch(as_dtype(model_output, compute), as_dtype(sample, compute), idx, noise)
        prev = as_dtype(prev, model_output.dtype)
        pred = as_dtype(pred, torch.promote_types(torch.float32, model_output.dtype))
        return self._pygen_output(EulerAncestralDiscreteSchedulerOutput, prev, pred, return_dict)
