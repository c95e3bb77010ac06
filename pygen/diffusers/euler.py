"""Fused ``EulerDiscreteScheduler`` (diffusers namesake; math in k-diffusion's sigma space).

Row i of the table (columns of csrc/include/pygen/step.h), sigma = sigmas[i], next = sigmas[i+1]::

    d      = cx·x + cm·model_output     # pred_original_sample: epsilon x - sigma·eps,
                                        # v_prediction x/(sigma²+1) - sigma/sqrt(sigma²+1)·v, sample
    x_next = x + (x - d)/sigma·(next - sigma) = (next/sigma)·x + (1 - next/sigma)·d

The sigmas are the ones diffusers' ``set_timesteps`` computed, so every schedule option
(timestep spacing, ``interpolation_type``, Karras / exponential / beta sigmas,
``final_sigmas_type``, ``rescale_betas_zero_snr``, ``timestep_type="continuous"``, custom
``timesteps=`` / ``sigmas=``) is the stock one.

``step()`` with the default ``s_churn=0`` is one fused launch. With ``s_churn > 0``:

- when gamma > 0 at every step (the usual case, e.g. the default ``s_tmin=0``,
  ``s_tmax=inf``), diffusers draws noise at every step; so does pygen, with diffusers'
  ``randn_tensor(model_output.shape, generator=...)`` (torch's global RNG without a
  generator), adds ``s_noise·sqrt(sigma_hat² - sigma²)·noise`` with device ops and runs the
  fused step from a second table (sigma_hat rows, cached per ``(s_churn, s_tmin, s_tmax)``);
  no host sync;
- when gamma is 0 at some steps and > 0 at others (``s_tmin``/``s_tmax`` cut the schedule),
  whether diffusers draws noise depends on the step index, so that rare call runs the stock
  step (one host read of the step index), keeping the device index in sync.

``scale_model_input`` is one fused launch: ``sample·(1/sqrt(sigma² + 1))`` with the factor read
from a device table at the device step index. Output dtypes are the stock ones: the arithmetic
is float32 (float64 if either input is float64), ``prev_sample`` has ``model_output``'s dtype,
``pred_original_sample`` the promoted float32 dtype (``model_output``'s own dtype for
``prediction_type="sample"``). When sample and model_output are both float16 (or bfloat16), the
kernel reads and writes them directly and writes pred_original_sample in float32: one launch,
no upcast copies, the same values as upcasting first.
Per-row timesteps (a 1-D ``timestep`` with one entry per batch row) are supported: every
row steps independently.
"""
import math

import diffusers
import torch
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

from pygen.diffusers._base import FusedSchedulerMixin, as_dtype, half_io
from pygen.ops.schedule import COL_A, COL_B, COL_CM, COL_CX, COL_HIST, COL_SLOT

__all__ = ["EulerDiscreteScheduler"]

logger = logging.get_logger(__name__)

_INT_TIMESTEP_MSG = ("Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to"
                     " `EulerDiscreteScheduler.step()` is not supported. Make sure to pass"
                     " one of the `scheduler.timesteps` as a timestep.")
_SCALE_MSG = ("The `scale_model_input` function should be called before `step` to ensure correct denoising. "
              "See `StableDiffusionPipeline` for a usage example.")


def host_sigmas(scheduler):
    """``scheduler.sigmas`` as a float64 Python list (set-up time only)."""
    return scheduler.sigmas.detach().to("cpu", torch.float64).tolist()


def denoise_cols(row, prediction_type, sigma, scheduler_name, eps_sigma=None, allow_sample=True):
    """Set cx, cm of ``row`` so that d = cx·x + cm·model_output is diffusers' pred_original_sample."""
    nan = float("nan")
    if prediction_type == "epsilon":
        row[COL_CX], row[COL_CM] = 1.0, -(sigma if eps_sigma is None else eps_sigma)
    elif prediction_type == "v_prediction":
        row[COL_CX], row[COL_CM] = 1.0 / (sigma * sigma + 1.0), -sigma / math.sqrt(sigma * sigma + 1.0)
    elif prediction_type in ("sample", "original_sample") and allow_sample:
        row[COL_CX], row[COL_CM] = 0.0, 1.0
    elif prediction_type == "sample":
        row[COL_CX] = row[COL_CM] = nan  # step() raises diffusers' NotImplementedError first
    else:
        raise ValueError(f"prediction_type given as {prediction_type} must be one of `epsilon`, or "
                         f"`v_prediction` ({scheduler_name})")


def empty_rows(n, width=COL_HIST):
    """n zero rows (Python lists, filled on the host then made a tensor by ``as_table``), slot -1."""
    rows = [[0.0] * width for _ in range(n)]
    for row in rows:
        row[COL_SLOT] = -1.0
    return rows


def as_table(rows, width=COL_HIST):
    return torch.tensor(rows, dtype=torch.float64).reshape(len(rows), width)


def sigma_space_rows(sigmas, prediction_type, scheduler_name, sigma_hats=None):
    """Euler rows for a float64 list of sigmas (n steps + final); ``sigma_hats``: churned sigmas."""
    n = len(sigmas) - 1
    rows = empty_rows(n)
    for i in range(n):
        s, sn = sigmas[i], sigmas[i + 1]
        sh = s if sigma_hats is None else sigma_hats[i]
        denoise_cols(rows[i], prediction_type, s, scheduler_name, eps_sigma=sh)
        rows[i][COL_A] = sn / sh
        rows[i][COL_B] = 1.0 - sn / sh
    return as_table(rows)


def compute_dtype(sample, model_output):
    """diffusers upcasts the sample to float32; pygen keeps float64 when an input is float64."""
    if sample.dtype == torch.float64 or model_output.dtype == torch.float64:
        return torch.float64
    return torch.float32


def view_rows(values, idx, like):
    """``values[idx]`` shaped to broadcast against ``like`` (one value, or one per batch row)."""
    v = values.index_select(0, idx.clamp(0, values.shape[0] - 1))
    return v.view((-1,) + (1,) * (like.dim() - 1)) if idx.numel() > 1 else v


class CInMixin:
    """``scale_model_input`` = sample / sqrt(sigma² + 1) with sigma = sigmas[device step index], as one
    fused launch (the step op on a table whose only column is ``a = 1/sqrt(sigma² + 1)``)."""

    def _pygen_prepare(self):
        super()._pygen_prepare()
        self._pygen_c_in = {}

    def _pygen_c_in_table(self, device, acc):
        table = self._pygen_c_in.get((device, acc))
        if table is None:
            sig = self.sigmas.detach().to("cpu", torch.float64)
            rows = torch.zeros(sig.shape[0], COL_HIST, dtype=torch.float64)
            rows[:, COL_A] = (sig * sig + 1).rsqrt()
            rows[:, COL_SLOT] = -1.0
            table = self._pygen_c_in[(device, acc)] = rows.to(device=device, dtype=acc)
        return table

    def _pygen_warm(self, device):
        super()._pygen_warm(device)
        self._pygen_c_in_table(device, torch.float32)

    def _pygen_scale(self, sample, timestep):
        idx = self._pygen_step_index(timestep, sample)
        acc = torch.float64 if sample.dtype == torch.float64 else torch.float32
        return self._pygen_apply(self._pygen_c_in_table(sample.device, acc), sample, idx)


class EulerDiscreteScheduler(CInMixin, FusedSchedulerMixin, diffusers.EulerDiscreteScheduler):
    """diffusers' EulerDiscreteScheduler with a fused, sync-free ``step()`` (same config and API).

    See the module docstring for the ``s_churn`` paths and output dtypes.
    """

    _pygen_add_noise_kind = "ve"

    def _pygen_rows(self):
        return sigma_space_rows(host_sigmas(self), self.config.prediction_type, type(self).__name__)

    def _pygen_prepare(self):
        super()._pygen_prepare()
        self._pygen_churn_key = None  # (s_churn, s_tmin, s_tmax) while a churned step launches
        self._pygen_churn = {}        # key -> (float64 rows, float64 noise scales, all_noisy)
        self._pygen_churn_dev = {}    # (key, device, dtype) -> table / noise scales there

    def _pygen_table(self, device, dtype):
        key = self._pygen_churn_key
        if key is None:
            return super()._pygen_table(device, dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        dkey = (key, "rows", device, acc)
        table = self._pygen_churn_dev.get(dkey)
        if table is None:
            table = self._pygen_churn_dev[dkey] = self._pygen_churn[key][0].to(device=device, dtype=acc)
        return table

    def _pygen_churn_plan(self, s_churn, s_tmin, s_tmax):
        key = (float(s_churn), float(s_tmin), float(s_tmax))
        plan = self._pygen_churn.get(key)
        if plan is None:
            sig = self.sigmas.detach().to("cpu", torch.float32).tolist()  # diffusers compares fp32 sigmas
            n = len(sig) - 1
            g = min(s_churn / n, 2 ** 0.5 - 1)
            gammas = [g if s_tmin <= s <= s_tmax else 0.0 for s in sig[:n]]
            sig64 = host_sigmas(self)
            hats = [s * (gm + 1) for s, gm in zip(sig64, gammas)]
            rows = sigma_space_rows(sig64, self.config.prediction_type, type(self).__name__, sigma_hats=hats)
            scales = torch.tensor([math.sqrt(max(h * h - s * s, 0.0)) for h, s in zip(hats, sig64)] + [0.0],
                                  dtype=torch.float64)
            plan = self._pygen_churn[key] = (rows, scales, all(gm > 0 for gm in gammas))
        return key, plan

    def scale_model_input(self, sample, timestep):
        out = self._pygen_scale(sample, timestep)
        self.is_scale_input_called = True
        return out

    def _pygen_stock_step(self, *args):
        """The stock step (host math) with the step index handed over both ways."""
        index = self._pygen_index
        if index is not None and index.numel() != 1:
            raise ValueError("s_churn > 0 with s_tmin/s_tmax cutting the schedule needs a scalar timestep")
        sample = args[2]
        self._pygen_index = None
        self._step_index = int(index.item()) if index is not None else None
        try:
            out = diffusers.EulerDiscreteScheduler.step(self, *args)
        finally:
            if self._step_index is not None:
                self._pygen_index = torch.full((1,), self._step_index, dtype=torch.int64, device=sample.device)
        return out

    def step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
             generator=None, return_dict=True):
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError(_INT_TIMESTEP_MSG)
        if getattr(self, "_pygen_table64", None) is None:
            raise ValueError("call set_timesteps() before step()")
        if not self.is_scale_input_called:
            logger.warning(_SCALE_MSG)
        churn = None
        if s_churn > 0:
            key, plan = self._pygen_churn_plan(s_churn, s_tmin, s_tmax)
            if not plan[2]:
                return self._pygen_stock_step(model_output, timestep, sample, s_churn, s_tmin, s_tmax, s_noise,
                                              generator, return_dict)
            churn = key
        idx = self._pygen_step_index(timestep, sample)
        sample_pred = self.config.prediction_type in ("sample", "original_sample")
        if churn is None and half_io(sample, model_output):  # one launch: half in, half prev, fp32 pred
            prev, pred = self._pygen_launch(model_output, sample, idx, None,
                                            pred_dtype=sample.dtype if sample_pred else torch.float32)
            return self._pygen_output(EulerDiscreteSchedulerOutput, prev, pred, return_dict)
        compute = compute_dtype(sample, model_output)
        x = as_dtype(sample, compute)
        if churn is not None:
            noise = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                                 generator=generator)
            skey = (churn, "scale", sample.device, compute)
            scales = self._pygen_churn_dev.get(skey)
            if scales is None:
                scales = self._pygen_churn_dev[skey] = self._pygen_churn[churn][1].to(sample.device, compute)
            x = x + (noise * s_noise).to(compute) * view_rows(scales, idx, x)
        self._pygen_churn_key = churn
        try:
            prev, pred = self._pygen_launch(as_dtype(model_output, compute), x, idx, None)
        finally:
            self._pygen_churn_key = None
        prev = as_dtype(prev, model_output.dtype)
        if sample_pred:
            pred = as_dtype(pred, model_output.dtype)
        else:
            pred = as_dtype(pred, torch.promote_types(torch.float32, model_output.dtype))
        return self._pygen_output(EulerDiscreteSchedulerOutput, prev, pred, return_dict)
