"""Fused ``FlowMatchEulerDiscreteScheduler`` (diffusers namesake): one fused launch per ``step()``.

Backends: whatever pygen resolves for the sample's device, through the general fused step
``torch.ops.pygen.sampler_step_out``. Row i of the table (csrc/include/pygen/step.h), with
sigma = sigmas[i], next = sigmas[i + 1] (diffusers' float32 sigmas, shifted / Karras /
exponential / beta / inverted as its ``set_timesteps`` made them)::

    default:               d = model_output (velocity),   x_next = x + (next - sigma)·d
    stochastic_sampling:   d = x - sigma·model_output (x0), x_next = (1 - next)·d + next·z

``step()`` returns ``FlowMatchEulerDiscreteSchedulerOutput(prev_sample)`` in model_output's
dtype (computed in float32, float64 for float64 samples) as diffusers does. ``s_churn``,
``s_tmin``, ``s_tmax``, ``s_noise`` are accepted and ignored, as in diffusers. Stochastic
sampling draws ``randn_tensor(sample.shape, generator=..., dtype=float32)`` when a generator is
given (diffusers-exact), else in-kernel Philox (see pygen/diffusers/_base.py for the
``pygen_noise`` config option).

``scale_noise`` finds its step indices on the device (no host sync, also when called inside
the loop as inpainting pipelines do).

Not fused: ``step(..., per_token_timesteps=...)`` (per-token sigmas) runs the stock step, the
device step index kept in sync. Per-row timesteps (a 1-D ``timestep`` tensor, one per batch
row) are fused: each row advances along the schedule independently.
"""
import diffusers
import torch
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

from pygen.diffusers._base import FusedSchedulerMixin, as_dtype, fast_output, half_io
from pygen.ops.schedule import COL_A, COL_B, COL_CM, COL_CX, COL_HIST, COL_S, COL_SLOT

__all__ = ["FlowMatchEulerDiscreteScheduler"]


class FlowMatchEulerDiscreteScheduler(FusedSchedulerMixin, diffusers.FlowMatchEulerDiscreteScheduler):
    """diffusers' FlowMatchEulerDiscreteScheduler with a fused, sync-free ``step()`` (same config and API)."""

    def _pygen_rows(self):
        sig = self.sigmas.detach().to("cpu", torch.float32)
        n = sig.shape[0] - 1
        dt = (sig[1:] - sig[:-1]).double()  # float32 difference, as diffusers forms dt
        sig64 = sig.double()
        rows = torch.zeros(n, COL_HIST, dtype=torch.float64)
        rows[:, COL_SLOT] = -1.0
        if self.config.stochastic_sampling:
            rows[:, COL_CX] = 1.0
            rows[:, COL_CM] = -sig64[:-1]
            rows[:, COL_B] = 1.0 - sig64[1:]
            rows[:, COL_S] = sig64[1:]
        else:
            rows[:, COL_CM] = 1.0
            rows[:, COL_A] = 1.0
            rows[:, COL_B] = dt
        return rows

    def _pygen_prepare(self):
        super()._pygen_prepare()
        self._pygen_sig = {}

    def _pygen_sigmas_on(self, device, dtype):
        key = (device, dtype)
        sig = self._pygen_sig.get(key)
        if sig is None:
            sig = self._pygen_sig[key] = self.sigmas.to(device=device, dtype=dtype)
        return sig

    def scale_noise(self, sample, timestep, noise=None):
        if getattr(self, "_pygen_ts", None) is None:  # no set_timesteps yet (training use): stock lookup
            return super().scale_noise(sample, timestep, noise)
        sigmas = self._pygen_sigmas_on(sample.device, sample.dtype)
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1)
        if self.begin_index is None:
            idx = self._pygen_lookup(t, sample.device)
        elif self._pygen_index is not None:  # after the first step (inpainting)
            idx = self._pygen_index.expand(t.shape[0]) if self._pygen_index.numel() == 1 else self._pygen_index
        else:  # before the first step (img2img)
            idx = torch.full((t.shape[0],), int(self.begin_index), dtype=torch.int64, device=sample.device)
        n = sigmas.shape[0]
        sigma = sigmas.index_select(0, idx.clamp(0, n - 1))
        sigma = torch.where((idx >= 0) & (idx < n), sigma, torch.full_like(sigma, float("nan")))
        sigma = sigma.reshape((-1,) + (1,) * (sample.dim() - 1))
        return sigma * noise + (1.0 - sigma) * sample

    def step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
             generator=None, per_token_timesteps=None, return_dict=True):
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError(
                "Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to"
                " `FlowMatchEulerDiscreteScheduler.step()` is not supported. Make sure to pass"
                " one of the `scheduler.timesteps` as a timestep.")
        if per_token_timesteps is not None:  # per-token sigmas: the stock step (documented)
            if getattr(self, "_pygen_table64", None) is None:
                raise ValueError("call set_timesteps() before step()")
            self._step_index = self.step_index if self._pygen_index is not None else None
            out = super().step(model_output, timestep, sample, s_churn, s_tmin, s_tmax, s_noise, generator,
                               per_token_timesteps, return_dict)
            self._pygen_index = torch.full((1,), self._step_index, dtype=torch.int64, device=sample.device)
            return out
        idx = self._pygen_step_index(timestep, sample)
        compute = torch.float64 if sample.dtype == torch.float64 else torch.float32
        noise = None
        if self.config.stochastic_sampling:
            mode = self._pygen_noise_mode()
            if mode == "generator" or (mode == "auto" and generator is not None):
                from diffusers.utils.torch_utils import randn_tensor

                noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
        if noise is None and half_io(sample, model_output):
            prev, _ = self._pygen_launch(model_output, sample, idx, None, want_pred=False)  # half I/O, fp32 math
        else:
            prev, _ = self._pygen_launch(as_dtype(model_output, compute), as_dtype(sample, compute), idx, noise,
                                         want_pred=False)
        prev = as_dtype(prev, model_output.dtype)
        if not return_dict:
            return (prev,)
        return fast_output(FlowMatchEulerDiscreteSchedulerOutput, prev_sample=prev)
