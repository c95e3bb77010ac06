"""Fused ``DDIMScheduler`` (diffusers namesake).

Like diffusers' class the step is stateless: it depends on the timestep value only. The
table has one row per training timestep (see pygen/diffusers/ddpm.py, ``TimestepTableMixin``):
row ``t`` uses ``at = alphas_cumprod[t]`` and ``ap = alphas_cumprod[t - T // n]`` (T =
num_train_timesteps, n = num_inference_steps; ``final_alpha_cumprod`` — 1 with
set_alpha_to_one, else alphas_cumprod[0] — when that is negative), which is diffusers' rule
for every timestep spacing and steps_offset. With ``var = (1-ap)/(1-at)·(1 - at/ap)``,
``std = eta·sqrt(var)``, ``dir = sqrt(1 - ap - std²)``::

    d      = cx·x + cm·model_output            # pred_original_sample (epsilon / sample / v_prediction)
    d      = clamp(d, ±clip_sample_range)      # clip_sample, in the fused step
    eps    = (x - sqrt(at)·d) / sqrt(1-at)     # the model's noise estimate recomputed from d
    x_next = sqrt(ap)·d + dir·eps + std·z      # z only when eta > 0
           = a·x + b·d + s·z                   # a = dir/sqrt(1-at), b = sqrt(ap) - dir·sqrt(at)/sqrt(1-at)

That is exact when d was not clipped or when ``use_clipped_model_output=True``. When
pred_original_sample is clipped/thresholded and ``use_clipped_model_output`` is False,
diffusers keeps the *unclipped* noise estimate ``eps = ex·x + em·model_output``; the table
variant for it has ``a = dir·ex``, ``b = sqrt(ap)`` and one history column ``dir·em`` that
weights model_output passed as the step's read-only history (a view; slot -1 writes nothing):
still one fused launch, model_output read twice.

eta: ``eta`` is a step() argument; the table built at ``set_timesteps`` is for ``eta = 0``.
A step() with another eta (or another ``use_clipped_model_output``) uses a second table for
that value, built in float64 (vectorized torch ops on the CPU) the first time that value is
seen and cached — a host computation only when eta changes, never a device sync; a loop with a
constant eta builds it once. Tables used by a run are rebuilt by the next ``set_timesteps``, so
a second loop with the same eta finds its table ready.
Noise (eta > 0): ``variance_noise`` if given, else ``randn_tensor(model_output.shape,
generator)`` when a generator is given (diffusers-exact), else in-kernel Philox.

torch.compile(fullgraph=True) (see pygen/diffusers/_base.py and ddpm.py): the tables a compiled
step reads are the cached ones — those of the default step() arguments (eta = 0, and the
thresholded variant when ``thresholding``) are built at ``set_timesteps``, before any tracing.
A table missing when the step is traced (a new eta or ``use_clipped_model_output``) is built
in the graph by the same torch ops (no ``.tolist()``, no host read: it traces) and cached by
that call, so the next call compiles once more and reads the cache; every later
``set_timesteps`` rebuilds it eagerly, and a new schedule compiles nothing. The eta value is a
constant of the graph (a new eta compiles again, as any Python argument does).

thresholding: pred_original_sample from the table's cx/cm columns (device ops), per-row
quantile thresholding on the device, then the fused step finishes the update from the
thresholded d (a table variant with cx = 0, cm = 1), with the raw-eps history column above
when use_clipped_model_output is False. No host sync. ``clip_sample_range <= 0`` (a degenerate
clamp) takes the same device path with ``clamp(-r, r)``.

DDIM has no custom ``timesteps=`` in diffusers' set_timesteps, so neither does this class.
"""
import math

import diffusers
import torch
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

from pygen.diffusers._base import as_dtype
from pygen.diffusers.ddpm import NAN, PREDICTIONS, TimestepTableMixin, threshold_sample
from pygen.ops.schedule import COL_A, COL_B, COL_CM, COL_CX, COL_HIST, COL_S, COL_SLOT

__all__ = ["DDIMScheduler"]


class DDIMScheduler(TimestepTableMixin, diffusers.DDIMScheduler):
    """diffusers' DDIMScheduler with a fused, sync-free ``step()`` (same config and API).

    One fused launch per step for every prediction type, timestep spacing, steps_offset,
    set_alpha_to_one, rescale_betas_zero_snr, any eta (a cached table per eta value),
    clip_sample and use_clipped_model_output; thresholding runs on device ops before the fused
    step. See the module docstring.
    """

    def _pygen_default_key(self):
        clip = bool(self.config.thresholding or self.config.clip_sample)
        return (0.0, clip, False, self.config.prediction_type)

    def _pygen_warm_keys(self):
        cfg = self.config
        keys = (self._pygen_default_key(),)
        if cfg.thresholding or (cfg.clip_sample and not float(cfg.clip_sample_range) > 0):  # pred_x0 on the device
            keys += ((0.0, True, True, cfg.prediction_type),)
        return keys

    def _pygen_variant(self, key):
        """The (T, 8 [+ 1]) float64 rows of ``key`` = (eta, raw_eps, thresholded, prediction_type), from
        elementwise torch ops on the CPU (the formulas of the module docstring, per timestep, NaN/inf
        as Python floats give them), so that it also traces under torch.compile."""
        eta, raw_eps, thr, prediction_type = key
        at = self.alphas_cumprod.detach().to("cpu", torch.float64)
        final = torch.as_tensor(self.final_alpha_cumprod).detach().to("cpu", torch.float64).reshape(1)
        T = at.shape[0]
        offset = min(self.config.num_train_timesteps // self.num_inference_steps, T)
        ap = torch.cat([final.expand(offset), at[:T - offset]])  # alphas_cumprod[t - offset], else final
        sat, s1at, sap = at.sqrt(), (1.0 - at).sqrt(), ap.sqrt()  # NaN for a negative argument
        if prediction_type == "epsilon":  # (±inf at sat = ±0, as prediction_columns)
            cx = torch.where(sat == 0, math.inf, 1.0 / sat)
            cm = torch.where(sat == 0, -math.inf, -s1at / sat)
        elif prediction_type == "sample":
            cx, cm = torch.zeros_like(at), torch.ones_like(at)
        elif prediction_type == "v_prediction":
            cx, cm = sat, -s1at
        else:
            cx = cm = torch.full_like(at, NAN)
        var = (1.0 - ap) / (1.0 - at) * (1.0 - at / ap)
        std = eta * var.sqrt()
        direction = (1.0 - ap - std * std).sqrt()
        cols = [torch.zeros_like(at)] * COL_HIST
        cols[COL_CX], cols[COL_CM] = (torch.zeros_like(at), torch.ones_like(at)) if thr else (cx, cm)
        if raw_eps:  # eps = ex·x + em·model_output, from the unclipped pred_original_sample
            ex = (1.0 - sat * cx) / s1at
            em = -sat * cm / s1at
            cols[COL_A], cols[COL_B] = direction * ex, sap
            cols.append(direction * em)  # COL_HIST: weights model_output, passed as history
        else:
            cols[COL_A], cols[COL_B] = direction / s1at, sap - direction * sat / s1at
        if eta > 0:
            cols[COL_S] = std
        rows = torch.stack(cols, dim=1)
        bad = ~((at >= 0) & (at <= 1))  # NaN rows: no alphas_cumprod in [0, 1]
        rows[:, :COL_SLOT] = torch.where(bad[:, None], NAN, rows[:, :COL_SLOT])
        rows[:, COL_SLOT] = -1.0  # history columns read only
        return rows, rows.new_zeros((T, 0))

    def step(self, model_output, timestep, sample, eta=0.0, use_clipped_model_output=False, generator=None,
             variance_noise=None, return_dict=True):
        if self.num_inference_steps is None or getattr(self, "_pygen_host_cache", None) is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        self._pygen_check(model_output, sample)
        if self.config.prediction_type not in PREDICTIONS:
            raise ValueError(f"prediction_type given as {self.config.prediction_type} must be one of `epsilon`, "
                             "`sample`, or `v_prediction`")
        if isinstance(eta, torch.Tensor):
            eta = float(eta)  # a host read of the argument (diffusers tests `eta > 0` on the host too)
        eta = float(eta)
        index = self._pygen_timestep_index(timestep, sample)
        out_dtype = torch.promote_types(sample.dtype, model_output.dtype)
        thr = bool(self.config.thresholding)
        clip = (not thr) and bool(self.config.clip_sample)
        r = float(self.config.clip_sample_range)
        raw_eps = bool((thr or clip) and not use_clipped_model_output)
        device_x0 = thr or (clip and not r > 0)
        noise = self._pygen_noise(model_output, generator, variance_noise) if eta > 0 else None

        compute = out_dtype
        if device_x0:
            compute = torch.float64 if out_dtype == torch.float64 else torch.float32
        x = as_dtype(sample, compute)
        m = as_dtype(model_output, compute)
        pt = self.config.prediction_type
        key = (eta, raw_eps, False, pt)
        rows, _ = self._pygen_dev(key, x.device, x.dtype)
        m = m.contiguous()
        history = m.unsqueeze(0) if raw_eps else None  # the raw eps term (read only)
        if device_x0:
            x0 = self._pygen_pred_x0(rows, m, x, index)
            x0 = threshold_sample(x0, self.config.dynamic_thresholding_ratio,
                                  self.config.sample_max_value) if thr else x0.clamp(-r, r)
            rows_f, _ = self._pygen_dev((eta, raw_eps, True, pt), x.device, x.dtype)
            prev, pred = self._pygen_run(rows_f, x0.contiguous(), x, index, noise, history=history, noisy=eta > 0)
        else:
            prev, pred = self._pygen_run(rows, m, x, index, noise, clamp=r if clip else 0.0, history=history,
                                         noisy=eta > 0)
        prev, pred = as_dtype(prev, out_dtype), as_dtype(pred, out_dtype)
        return self._pygen_output(DDIMSchedulerOutput, prev, pred, return_dict)
