"""Fused ``DDPMScheduler`` (diffusers namesake) and the timestep-indexed table both DDPM and DDIM use.

DDPM and DDIM are stateless in diffusers: ``step(model_output, t, sample)`` depends on the
timestep value ``t`` only (not on how many steps ran before), there is no ``step_index`` and
no ``set_begin_index``. The fused classes keep that: their coefficient table has one row per
*training* timestep (``num_train_timesteps`` rows, float64 on the host, built at
``set_timesteps``), and the device index of a ``step()`` is the timestep value itself (no
lookup, never advanced). A timestep that is not in the schedule (DDPM) or out of range gives
a NaN row, so the step's outputs come out NaN instead of reading out of bounds. A 1-D
``timestep`` with one entry per batch row runs each row at its own timestep (per-row
timesteps); rows are independent, so a mixed batch equals running each row alone.

DDPM row for timestep ``t`` (columns of csrc/include/pygen/step.h), ``t'`` its previous
timestep (diffusers' rule: the next entry of ``self.timesteps``, -1 after the last; ``t - 1``
before any ``set_timesteps``), ``at = alphas_cumprod[t]``, ``ap = alphas_cumprod[t']``
(1 when ``t' < 0``), ``beta = 1 - at/ap``::

    d      = cx·x + cm·model_output       # pred_original_sample (epsilon / sample / v_prediction)
    d      = clamp(d, ±clip_sample_range) # clip_sample (in the fused step)
    x_next = sqrt(at/ap)·(1-ap)/(1-at)·x + sqrt(ap)·beta/(1-at)·d + s·z

with ``s`` the noise std of ``variance_type`` (0 at ``t = 0``): fixed_small / fixed_small_log
``sqrt(max((1-ap)/(1-at)·beta, 1e-20))``, fixed_large ``sqrt(beta)``, fixed_large_log
``sqrt(log(beta))`` (NaN, as in diffusers).

What is not one launch (still no host sync, all device torch ops):

- ``thresholding=True``: pred_original_sample from the table's cx/cm columns, per-row
  quantile thresholding on the device, then the fused step finishes the update from it
  (a table variant with cx = 0, cm = 1);
- ``variance_type="learned"`` / ``"learned_range"`` with a ``2·C``-channel model_output: the
  fused step runs without noise and the per-element noise std from the predicted-variance
  half is added with device ops (the noise is then drawn with ``randn_tensor`` — from the
  generator, or from torch's global RNG when there is none — never in-kernel).

Noise and the ``t > 0`` rule: diffusers draws ``randn_tensor(model_output.shape, generator)``
only when ``t > 0``. When the timestep is a Python number or a CPU tensor the fused step
applies the same rule (a host comparison, no device sync), so a seeded generator advances
exactly as in diffusers. When the timestep is a device tensor, testing it would sync, so
the noise is drawn at every step: outputs are identical (the ``t = 0`` row has no noise),
only the generator has advanced once more after a ``t = 0`` step. Under torch.compile a tensor
timestep (CPU or not) takes that device path too: the host test would be a data-dependent
branch; the outputs are the same.

torch.compile(fullgraph=True) (see pygen/diffusers/_base.py): the fused step goes through
``step_launcher`` (the traceable custom op), with the Philox key from ``_pygen_key(noisy=...)``
(a tensor under compile, 0 when the launch draws no in-kernel noise), so a new
``set_timesteps`` does not compile again. The tables a compiled step reads must be cached
before tracing (a host build does not trace): the variants the default step()
arguments read (DDPM: all of them) are built at ``set_timesteps`` on the device of
``self.timesteps``, and every (variant, device, dtype) a run used is rebuilt by the next
``set_timesteps``, so a compiled loop's guards on the caches keep holding. Under compile the
step index and the history passed to the op are fresh tensors computed from the timestep /
model output (``+ 0``, ``* 1``), never views of a graph input: the op declares them mutated,
and PyTorch regenerates a mutated view of an input from the storage offset seen at trace
time (the element ``self.timesteps[k]`` sits at offset k), so a view, or even a copy of one
(Inductor folds the copy into that view), would read another timestep's row.
"""
import math

import diffusers
import numpy as np
import torch
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput

from pygen.diffusers._base import FusedSchedulerMixin, MissingTimestepError, as_dtype, step_launcher
from pygen.ops.schedule import COL_A, COL_B, COL_CM, COL_CX, COL_HIST, COL_S, COL_SLOT

__all__ = ["DDPMScheduler", "TimestepTableMixin", "threshold_sample", "prediction_columns"]

PREDICTIONS = ("epsilon", "sample", "v_prediction")
NAN = float("nan")


def _sqrt(v):
    return math.sqrt(v) if v >= 0 else NAN  # NaN (not complex) for a negative or NaN argument


def _log(v):
    if v > 0:
        return math.log(v)
    return -math.inf if v == 0 else NAN


def prediction_columns(prediction_type, at):
    """(cx, cm) with pred_original_sample = cx·x + cm·model_output at alphas_cumprod ``at``."""
    sat, s1at = _sqrt(at), _sqrt(1.0 - at)
    if prediction_type == "epsilon":
        return (1.0 / sat if sat else math.inf), (-s1at / sat if sat else -math.inf)
    if prediction_type == "sample":
        return 0.0, 1.0
    if prediction_type == "v_prediction":
        return sat, -s1at
    return NAN, NAN


def threshold_sample(x0, ratio, max_value):
    """diffusers' dynamic thresholding with device ops: per batch row, s = quantile(|x0|, ratio)
    clamped to [1, max_value]; x0 -> clamp(x0, -s, s) / s. Computed in fp32 for half inputs."""
    dtype = x0.dtype
    flat = x0.reshape(x0.shape[0], -1)
    if dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(dtype)


def _host64(a):
    """A float64 contiguous CPU tensor from a numpy array or a tensor."""
    if isinstance(a, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))
    return a.detach().to("cpu", torch.float64).contiguous()


def _to_device(t, device, dtype):
    t = t.to(dtype)
    if device.type == "cuda":  # pinned + non_blocking: the upload does not block the host
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class TimestepTableMixin(FusedSchedulerMixin):
    """Shared by the fused DDPM and DDIM: tables indexed by the timestep value (see module doc).

    A table *variant* (``key``) is a float64 host pair ``(rows (T, 8 + history columns), aux (T, k))`` built by
    ``_pygen_variant(key)`` and cached per ``set_timesteps``; its device copies are cached per
    (device, accumulation dtype) on first use.
    """

    _PYGEN_KEEP_TABLES = 8  # table variants carried over to the next set_timesteps (see _pygen_prepare)

    def _pygen_variant(self, key):
        raise NotImplementedError

    def _pygen_default_key(self):
        raise NotImplementedError

    def _pygen_rows(self):
        return self._pygen_host(self._pygen_default_key())[0]

    def _pygen_prepare(self):
        # tables used before (variant, device, dtype) are rebuilt for the new schedule, so a compiled
        # loop finds them cached again (its guards hold: no recompilation per set_timesteps); the
        # _PYGEN_KEEP_TABLES most recently built only (an eta sweep does not grow set-up without end)
        used = tuple(getattr(self, "_pygen_dev_cache", None) or ())[-self._PYGEN_KEEP_TABLES:]
        self._pygen_host_cache = {}
        self._pygen_dev_cache = {}
        super()._pygen_prepare()
        for key, device, acc in used:
            self._pygen_dev(key, device, acc)

    def _pygen_host(self, key):
        got = self._pygen_host_cache.get(key)
        if got is None:
            rows, aux = self._pygen_variant(key)  # float64: numpy arrays (filled element by element) or tensors
            got = self._pygen_host_cache[key] = (_host64(rows), _host64(aux))
        return got

    def _pygen_dev(self, key, device, dtype):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        k = (key, device, acc)
        got = self._pygen_dev_cache.get(k)
        if got is None:
            if torch.compiler.is_compiling():
                # built while tracing: from the host copy, else by the traceable builder (DDIM's is
                # torch ops); cached, so the next call compiles once more and reads it
                host = self._pygen_host_cache.get(key)
                if host is None:
                    host = self._pygen_variant(key)
                got = tuple(h.to(device=device, dtype=acc) for h in host)
            else:
                rows, aux = self._pygen_host(key)
                got = (_to_device(rows, device, acc), _to_device(aux, device, acc))
            self._pygen_dev_cache[k] = got
        return got

    def _pygen_warm_keys(self):
        """The variants a loop with the default step() arguments reads (built at set_timesteps)."""
        return (self._pygen_default_key(),)

    def _pygen_warm(self, device):
        for key in self._pygen_warm_keys():
            self._pygen_dev(key, device, torch.float32)
        self._pygen_host_index(0, device)  # makes the per-device arange of row indices

    @staticmethod
    def _pygen_empty_rows(n, history=0):
        """(n, 8 + history) float64 numpy rows, slot -1 (numpy: cheap element writes on the host).
        The history columns weight tensors passed as the step's ``history`` (read only: slot -1)."""
        rows = np.zeros((n, COL_HIST + history))
        rows[:, COL_SLOT] = -1.0
        return rows

    # stateless like diffusers' class: no step_index / begin_index / set_begin_index
    # (pipelines probe ``hasattr(scheduler, "set_begin_index")``; a property raising
    # AttributeError makes hasattr() False, as for the stock class)
    @property
    def step_index(self):
        raise AttributeError(f"{type(self).__name__} has no step_index: its step depends on the timestep only")

    @property
    def begin_index(self):
        raise AttributeError(f"{type(self).__name__} has no begin_index: its step depends on the timestep only")

    @property
    def set_begin_index(self):
        raise AttributeError(f"{type(self).__name__} has no set_begin_index: its step depends on the timestep only")

    # --- per step ------------------------------------------------------------
    @staticmethod
    def _pygen_check(model_output, sample, channels_mult=1):
        for name, v in (("model_output", model_output), ("sample", sample)):
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
            if not v.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got {v.dtype}")
        if sample.dim() < 1:
            raise ValueError("sample must have a batch dimension")
        if model_output.device != sample.device:
            raise ValueError(f"model_output is on {model_output.device}, expected sample's device {sample.device}")
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output has shape {tuple(model_output.shape)}, expected the shape of sample "
                             f"{tuple(sample.shape)}" + (" (or twice its channels for a learned variance)"
                                                         if channels_mult == 2 else ""))

    def _pygen_timestep_index(self, timestep, sample):
        """int64 index tensor on sample's device: (1,) or one per batch row. No device sync; a timestep
        known on the host (a number, or a one-element CPU tensor) is a view into a per-device
        ``arange`` of the table's rows (no launch; the step never writes its index)."""
        device = sample.device
        if isinstance(timestep, torch.Tensor):
            if timestep.dim() > 1 or (timestep.numel() not in (1, sample.shape[0])):
                raise ValueError(f"timestep must be a scalar or have one entry per batch row ({sample.shape[0]}), "
                                 f"got shape {tuple(timestep.shape)}")
            if timestep.is_floating_point() or timestep.is_complex():
                timestep = timestep.to(torch.int64) if timestep.device.type != "cpu" else timestep.long()
            if timestep.numel() == 1 and timestep.device.type == "cpu" and device.type != "cpu":
                return self._pygen_host_index(int(timestep), device)  # host read of a CPU tensor
            return timestep.reshape(-1).to(device=device, dtype=torch.int64)
        if isinstance(timestep, bool) or not isinstance(timestep, (int, float)):
            raise TypeError(f"timestep must be an int or a torch.Tensor, got {type(timestep).__name__}")
        return self._pygen_host_index(int(timestep), device)

    def _pygen_host_index(self, t, device):
        rows = len(self.alphas_cumprod)  # the table's rows
        if torch.compiler.is_compiling() or not 0 <= t < rows:  # out of range: a NaN row in the kernel
            return torch.full((1,), t, dtype=torch.int64, device=device)
        cache = self.__dict__.setdefault("_pygen_aranges", {})
        got = cache.get(device)
        if got is None:  # (the arange, and its one-element views made so far: a view costs ~1 µs to make)
            got = cache[device] = (torch.arange(rows, dtype=torch.int64, device=device), {})
        view = got[1].get(t)
        if view is None:
            view = got[1][t] = got[0][t:t + 1]
        return view

    def _pygen_run(self, table, model_output, sample, index, noise=None, clamp=0.0, history=None, noisy=False):
        """One fused launch: (prev, pred) in sample's dtype; the index is not advanced. ``history``
        (H, *sample.shape), read only, adds Σ_j table[:, 8 + j]·history[j] to prev. ``noisy``: whether
        ``table`` has a nonzero noise column (then the step draws in-kernel noise when ``noise`` is None).

        Under torch.compile the index and ``history`` are fresh tensors computed by pointwise ops
        (``+ 0``, ``* 1``): the traced op declares them mutated (it writes neither here), and a
        mutated argument that is a view of a graph input is regenerated with the storage offset
        seen at trace time. The index of a tensor timestep is a view of it (``self.timesteps[k]``
        sits at offset k), DDIM's history a view of ``model_output`` (possibly an input): passed as
        is (and with Inductor even through ``clone()``), the compiled step reads them at the
        trace-time offset at every call: another timestep's row, another tensor's data."""
        launch = step_launcher(self._pygen_launchers, sample.device)
        if torch.compiler.is_compiling():
            index = index + 0
            history = history * 1 if history is not None else None
        sample = sample.contiguous()
        model_output = model_output.contiguous()
        if noise is not None:
            if noise.shape != sample.shape:
                raise ValueError(f"variance_noise has shape {tuple(noise.shape)}, expected {tuple(sample.shape)}")
            noise = noise.to(device=sample.device, dtype=sample.dtype).contiguous()
        prev = torch.empty_like(sample)
        pred = torch.empty_like(sample)
        launch(sample, model_output, table, index, history, noise, prev, pred,
               self._pygen_key(noisy=bool(noisy and noise is None)), 0, None, float(clamp), False)
        return prev, pred

    @staticmethod
    def _pygen_col(table, index, col, ndim):
        """Column ``col`` of ``table`` at ``index`` as a broadcastable (R, 1, ...) tensor (device ops).

        An out-of-range index is clamped here: every use is combined with a fused launch at the
        same index, whose NaN row already makes the affected outputs NaN."""
        v = table.index_select(0, index.clamp(0, table.shape[0] - 1))[:, col]
        return v.view((-1,) + (1,) * (ndim - 1))

    def _pygen_pred_x0(self, rows, model_output, sample, index):
        """pred_original_sample = cx·x + cm·model_output from the table (device ops)."""
        nd = sample.dim()
        cx, cm = self._pygen_col(rows, index, COL_CX, nd), self._pygen_col(rows, index, COL_CM, nd)
        return cx * sample + cm * model_output


class DDPMScheduler(TimestepTableMixin, diffusers.DDPMScheduler):
    """diffusers' DDPMScheduler with a fused, sync-free ``step()`` (same config and API).

    Fused in one launch: every prediction type, timestep spacing, steps_offset, custom
    timesteps, rescale_betas_zero_snr, clip_sample, variance types fixed_small(_log) and
    fixed_large(_log). Device ops around the fused step (no host sync): thresholding, learned
    and learned_range variances. Table indexed by the timestep value; see the module docstring
    for the rows and the noise rule. Works before ``set_timesteps`` (previous timestep t - 1),
    as the stock class does.
    """

    # --- tables ----------------------------------------------------------------
    def _pygen_prev_map(self):
        T = self.config.num_train_timesteps
        if self.custom_timesteps or self.num_inference_steps:
            prev = [None] * T
            ts = [int(v) for v in self.timesteps.detach().cpu().tolist()]
            for i, t in enumerate(ts):
                if 0 <= t < T and prev[t] is None:  # diffusers: the first match
                    prev[t] = ts[i + 1] if i + 1 < len(ts) else -1
            return prev
        return [t - 1 for t in range(T)]

    def _pygen_default_key(self):
        return (False, self.variance_type, self.config.prediction_type)

    def _pygen_warm_keys(self):
        cfg = self.config
        if cfg.thresholding or (cfg.clip_sample and not float(cfg.clip_sample_range) > 0):  # pred_x0 on the device
            return (self._pygen_default_key(), (True, self.variance_type, cfg.prediction_type))
        return (self._pygen_default_key(),)

    def _pygen_variant(self, key):
        thr, variance_type, prediction_type = key
        ac = self.alphas_cumprod.detach().to("cpu", torch.float64).tolist()
        T = len(ac)
        prev = self._pygen_prev_map()
        rows = self._pygen_empty_rows(T)
        aux = np.zeros((T, 3))  # noise flag (t > 0), min_log, max_log
        for t in range(T):
            if prev[t] is None:
                rows[t, :COL_SLOT] = NAN
                aux[t] = NAN
                continue
            at = ac[t]
            ap = ac[prev[t]] if prev[t] >= 0 else 1.0
            cur_alpha = at / ap
            beta = 1.0 - cur_alpha
            cx, cm = prediction_columns(prediction_type, at)
            rows[t, COL_CX], rows[t, COL_CM] = (0.0, 1.0) if thr else (cx, cm)
            rows[t, COL_A] = _sqrt(cur_alpha) * (1.0 - ap) / (1.0 - at)
            rows[t, COL_B] = _sqrt(ap) * beta / (1.0 - at)
            var = (1.0 - ap) / (1.0 - at) * beta
            var = var if (var != var or var >= 1e-20) else 1e-20  # clamp(min=1e-20), NaN stays
            if variance_type in ("fixed_small", "fixed_small_log"):
                s = _sqrt(var)
            elif variance_type == "fixed_large":
                s = _sqrt(beta)
            elif variance_type == "fixed_large_log":
                s = _sqrt(_log(beta))
            else:  # learned kinds: added with device ops
                s = 0.0
            rows[t, COL_S] = s if t > 0 else 0.0
            aux[t, 0] = 1.0 if t > 0 else 0.0
            aux[t, 1] = _log(var)
            aux[t, 2] = _log(beta)
        return rows, aux

    # --- step --------------------------------------------------------------------
    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        learned = self.variance_type in ("learned", "learned_range")
        self._pygen_check(model_output if not (learned and model_output.dim() > 1
                                               and model_output.shape[1] == 2 * sample.shape[1])
                          else model_output[:, :sample.shape[1]], sample, 2 if learned else 1)
        if self.config.prediction_type not in PREDICTIONS:
            raise ValueError(f"prediction_type given as {self.config.prediction_type} must be one of `epsilon`, "
                             "`sample` or `v_prediction`  for the DDPMScheduler.")
        if getattr(self, "_pygen_host_cache", None) is None:  # no set_timesteps yet: previous timestep t - 1
            self._pygen_prepare()
        predicted_variance = None
        if learned and model_output.shape[1] == 2 * sample.shape[1]:
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        index = self._pygen_timestep_index(timestep, sample)
        if ((self.custom_timesteps or self.num_inference_steps) and self._pygen_host_known(timestep)
                and (timestep.item() if isinstance(timestep, torch.Tensor) else timestep) not in self._pygen_first_index
                and self._pygen_host_match(timestep) is None):  # stock: IndexError in previous_timestep
            raise MissingTimestepError(f"timestep {float(timestep):g} is not in DDPMScheduler.timesteps (set by "
                                       "set_timesteps); pass one of scheduler.timesteps")

        # the t > 0 rule, decided on the host when that costs no device sync (under torch.compile a
        # tensor timestep is data: it takes the device path, no data-dependent branch)
        if isinstance(timestep, torch.Tensor) and (timestep.device.type != "cpu" or torch.compiler.is_compiling()):
            draw = True
        elif isinstance(timestep, (int, float)):
            draw = timestep > 0
        else:  # a CPU tensor or a sequence: read on the host (no device involved)
            draw = bool((torch.as_tensor(timestep) > 0).any())
        if learned and draw and predicted_variance is None:
            raise ValueError(f"variance_type={self.variance_type!r} needs a model_output with twice the channels of "
                             f"sample ({2 * sample.shape[1]}), got {model_output.shape[1]}")

        out_dtype = torch.promote_types(sample.dtype, model_output.dtype)
        thr = bool(self.config.thresholding)
        clip = (not thr) and bool(self.config.clip_sample)
        r = float(self.config.clip_sample_range)
        device_x0 = thr or (clip and not r > 0)  # pred_x0 post-processed with device ops
        compute = out_dtype
        if learned or device_x0:
            compute = torch.float64 if out_dtype == torch.float64 else torch.float32
        x = as_dtype(sample, compute)
        m = as_dtype(model_output, compute)
        noise = None
        if draw:
            noise = self._pygen_noise(model_output, generator)
            if learned and noise is None:  # per-element std: the noise must exist outside the kernel
                from diffusers.utils.torch_utils import randn_tensor

                noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                     dtype=model_output.dtype)
        kernel_noise = None if learned else noise

        vt, pt = self.variance_type, self.config.prediction_type
        noisy = draw and not learned  # the table's noise column (learned kinds: 0, noise added outside)
        rows, aux = self._pygen_dev((False, vt, pt), x.device, x.dtype)
        if device_x0:
            x0 = self._pygen_pred_x0(rows, m, x, index)
            if thr:
                x0 = threshold_sample(x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
            else:
                x0 = x0.clamp(-r, r)
            rows_f, _ = self._pygen_dev((True, vt, pt), x.device, x.dtype)
            prev, pred = self._pygen_run(rows_f, x0.contiguous(), x, index, kernel_noise, noisy=noisy)
        else:
            prev, pred = self._pygen_run(rows, m, x, index, kernel_noise, clamp=r if clip else 0.0, noisy=noisy)

        if learned and noise is not None:
            pv = predicted_variance.to(compute)
            flag = self._pygen_col(aux, index, 0, x.dim())
            if vt == "learned":
                std = pv.sqrt()
            else:
                frac = (pv + 1) / 2
                max_log, min_log = self._pygen_col(aux, index, 2, x.dim()), self._pygen_col(aux, index, 1, x.dim())
                log_var = frac * max_log + (1 - frac) * min_log
                std = torch.exp(0.5 * log_var)
            zero = torch.zeros((), dtype=compute, device=x.device)
            prev = prev + torch.where(flag > 0, std * noise.to(compute), zero)  # t = 0: no noise (not 0·NaN)
        prev, pred = as_dtype(prev, out_dtype), as_dtype(pred, out_dtype)
        return self._pygen_output(DDPMSchedulerOutput, prev, pred, return_dict)
