"""Fused ``EulerDiscreteScheduler`` (diffusers namesake; math in k-diffusion's sigma space).

Row i of the table (columns of csrc/include/pygen/step.h), sigma = sigmas[i], next = sigmas[i+1]::

    d      = cx·x + cm·model_output     # pred_original_sample: epsilon x - sigma·eps,
                                        # v_prediction x/(sigma²+1) - sigma/sqrt(sigma²+1)·v, sample
    x_next = x + (x - d)/sigma·(next - sigma) = (next/sigma)·x + (1 - next/sigma)·d

``step()`` with the default ``s_churn=0`` is one fused launch; a call with ``s_churn > 0``
(noise before the update, drawn with diffusers' ``randn_tensor``) runs the stock step.
``scale_model_input`` reads sigma from a device table at the device step index.
"""
import diffusers
import torch
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput

from pygen.diffusers._base import FusedSchedulerMixin
from pygen.ops.schedule import COL_A, COL_B, COL_CM, COL_CX, COL_HIST

__all__ = ["EulerDiscreteScheduler"]


def sigma_space_rows(sigmas, prediction_type, scheduler_name):
    """Euler rows in sigma space for a float64 list of sigmas (n steps + final)."""
    n = len(sigmas) - 1
    rows = torch.zeros(n, COL_HIST, dtype=torch.float64)
    rows[:, 7] = -1.0
    for i in range(n):
        s, sn = sigmas[i], sigmas[i + 1]
        if prediction_type in ("epsilon",):
            rows[i, COL_CX], rows[i, COL_CM] = 1.0, -s
        elif prediction_type == "v_prediction":
            rows[i, COL_CX], rows[i, COL_CM] = 1.0 / (s * s + 1.0), -s / (s * s + 1.0) ** 0.5
        elif prediction_type in ("sample", "original_sample"):
            rows[i, COL_CM] = 1.0
        else:
            raise ValueError(f"prediction_type given as {prediction_type} must be one of `epsilon`, or "
                             f"`v_prediction` ({scheduler_name})")
        rows[i, COL_A] = sn / s
        rows[i, COL_B] = 1.0 - sn / s
    return rows


class EulerDiscreteScheduler(FusedSchedulerMixin, diffusers.EulerDiscreteScheduler):
    """diffusers' EulerDiscreteScheduler with a fused, sync-free ``step()`` (same config and API)."""

    def _pygen_rows(self):
        sig = self.sigmas.detach().to("cpu", torch.float64).tolist()
        pred = self.config.prediction_type
        if self.config.timestep_type == "continuous" and pred == "v_prediction":
            # diffusers' continuous-v scaling: same formula on these sigmas
            pass
        return sigma_space_rows(sig, pred, type(self).__name__)

    def _pygen_prepare(self):
        super()._pygen_prepare()
        self._pygen_c_in = {}

    def scale_model_input(self, sample, timestep):
        idx = self._pygen_step_index(timestep, sample)
        c_in = self._pygen_c_in.get(sample.device)
        if c_in is None:
            sig = self.sigmas.to(torch.float64)
            c_in = self._pygen_c_in[sample.device] = (sig * sig + 1).rsqrt().to(sample.device, torch.float32)
        self.is_scale_input_called = True
        scale = c_in.index_select(0, idx.clamp(0, c_in.shape[0] - 1))
        scale = scale.view((-1,) + (1,) * (sample.dim() - 1)) if idx.numel() > 1 else scale
        return (sample * scale).to(sample.dtype)

    def step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
             generator=None, return_dict=True):
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError(
                "Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to"
                " `EulerDiscreteScheduler.step()` is not supported. Make sure to pass"
                " one of the `scheduler.timesteps` as a timestep.")
        if s_churn > 0:  # noise before the update at this step's sigma: the stock step (host math)
            self._step_index = self.step_index if self._pygen_index is not None else None
            out = super().step(model_output, timestep, sample, s_churn, s_tmin, s_tmax, s_noise, generator,
                               return_dict)
            self._pygen_index = torch.full((1,), self._step_index, dtype=torch.int64, device=sample.device)
            return out
        idx = self._pygen_step_index(timestep, sample)
        compute = torch.float32 if sample.dtype in (torch.float16, torch.bfloat16) else sample.dtype
        prev, pred = self._pygen_launch(model_output, sample.to(compute), idx, None,
                                        out_dtype=None)
        prev = prev.to(model_output.dtype)
        return self._pygen_output(EulerDiscreteSchedulerOutput, prev, pred, return_dict)
