"""Shared machinery of pygen's fused diffusers schedulers (``pygen.diffusers``).

A pygen scheduler subclasses the stock diffusers class (so config, ``from_config``,
``from_pretrained``, ``save_pretrained``, ``compatibles``, ``set_timesteps``,
``add_noise``... are the original ones) and mixes in ``FusedSchedulerMixin`` *first*::

    class EulerDiscreteScheduler(FusedSchedulerMixin, diffusers.EulerDiscreteScheduler):
        def _pygen_rows(self):            # float64 (K, 8 + H) table, one row per step() call
            ...
        def step(self, model_output, timestep, sample, ..., generator=None, return_dict=True):
            idx = self._pygen_step_index(timestep, sample)
            noise = self._pygen_noise(model_output, generator, variance_noise=None, needed=...)
            prev, pred = self._pygen_launch(model_output, sample, idx, noise)
            return self._pygen_output(EulerDiscreteSchedulerOutput, prev, pred, return_dict)

What the mixin keeps, all on the sample's device and built once per ``set_timesteps``:

- the coefficient table of the fused step (columns of csrc/include/pygen/step.h; row i is
  used by the i-th ``step()``), made by the subclass's ``_pygen_rows()`` in float64 on the
  host from the tables diffusers computed (one host read at set-up, never in the loop);
- the step index as a device int64 tensor, advanced by the fused step itself (made at
  ``set_timesteps``, so the loop allocates none). The first ``step()`` finds it without a host
  sync: ``begin_index`` if set, else the position of ``timestep`` in ``self.timesteps``
  (diffusers' rule: the second match when a timestep repeats), looked up on the host when
  ``timestep`` is a Python number, a CPU tensor or an element of ``self.timesteps`` itself (what
  pipelines pass: its position is its address), else computed on the device. Starting at index 0
  (the usual case) costs no launch. A 1-D ``timestep`` with one entry per batch row gives one
  step index per row (per-row timesteps);
- the device tables for float32 accumulation (fp32/fp16/bf16 samples) are uploaded at
  ``set_timesteps`` to the device of ``self.timesteps`` (``set_timesteps(device=...)``); other
  devices and float64 on first use;
- the history buffer of multistep methods (allocated at the first step, from the
  sample's shape);
- the Philox key of in-kernel noise, drawn from torch's global RNG (``default_seed()``): at
  ``set_timesteps`` when the schedule's table draws in-kernel noise (EulerAncestral, DDPM, the SDE
  variants; not with ``pygen_noise="generator"``), else at the first step that asks for it (DDIM with
  ``eta > 0``; one CPU read, no device involved). A noise-free schedule (Euler, Heun, LMS, DDIM's
  default eta = 0, DPM-Solver's ODE variants, UniPC, FlowMatch) never touches torch's RNG, as stock
  diffusers does not, so ``torch.manual_seed`` alone reproduces a stock pipeline's latents and result.

``set_timesteps`` shows the stock signature (``inspect.signature`` is what diffusers' pipelines
read to decide whether ``timesteps=`` / ``sigmas=`` may be passed): each class's ``set_timesteps``
is a wrapper of its stock twin's, made in ``FusedSchedulerMixin.__init_subclass__``.

A timestep that is not in ``self.timesteps`` (compared as stock compares, with its type promotion):
DPM-Solver and UniPC use the last step, as stock does; DDIM takes any timestep, as stock; the
other classes raise ``MissingTimestepError`` (a ``ValueError`` and an ``IndexError``, which stock
raises) when the timestep is known on the host, and give NaN outputs when it is a device tensor
(checking it there would sync).

torch.compile(fullgraph=True): under compilation the fused step goes through the custom op
``pygen_diffusers::keyed_step_out`` (wrapping ``pygen::sampler_step_out`` or its ``_triton``
twin; fake-registered), with the Philox key as a CPU tensor so a new ``set_timesteps`` does
not recompile. Graphs per loop are bounded (first call, then per value of host counters such as
DPM's ``lower_order_nums``). A ``generator`` does not trace (torch.randn(generator=) is not
supported by dynamo): compile the in-kernel (Philox) noise path.

``step_index`` stays an int property as in diffusers; reading it copies the device index to
the host (a sync only when user code asks for it; the loop never does).

Noise: with a ``generator`` (or ``variance_noise``) the noise is drawn exactly as diffusers
draws it (``randn_tensor(model_output.shape, generator=generator, ...)`` per step) and passed
to the fused step, so seeded results reproduce stock diffusers; without one it is drawn in
the kernel (Philox, stream = step index). The config key ``pygen_noise``
forces either: ``"generator"`` (always ``randn_tensor``, from torch's global RNG when no
generator is given) or ``"philox"`` (in-kernel even when a generator is given); the default
``"auto"`` is the rule above. Set it with ``Class.from_config(config, pygen_noise="philox")``
or ``scheduler.register_to_config(pygen_noise=...)`` (the constructor takes exactly the stock
arguments). It is stored in the config, so it survives ``save_pretrained`` / ``from_pretrained``;
stock diffusers ignores it.
"""
import dataclasses
import functools
from collections import OrderedDict
from typing import Optional

import torch

from pygen import _backend
from pygen.kdiffusion import default_seed
from pygen.ops.schedule import COL_HIST, COL_S
from pygen.samplers.program import check_model_out, resolve_step_launcher

__all__ = ["FusedSchedulerMixin", "OrderTablesMixin", "MissingTimestepError", "NOISE_MODES", "step_launcher", "fast_output",
           "as_dtype", "half_io"]

NOISE_MODES = ("auto", "generator", "philox")


_OUTPUT_FIELDS = {}


def fast_output(cls, **values):
    """``cls(**values)`` for a diffusers ``BaseOutput`` dataclass of tensors, built without its
    ``__post_init__`` (a quarter of the time; it runs once per step): every field an attribute,
    the non-None ones also dict items, exactly what ``__post_init__`` makes of tensor fields."""
    if torch.compiler.is_compiling():
        return cls(**values)
    names = _OUTPUT_FIELDS.get(cls)
    if names is None:
        names = _OUTPUT_FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))
    obj = cls.__new__(cls)
    for name in names:
        v = values.get(name)
        object.__setattr__(obj, name, v)
        if v is not None:
            OrderedDict.__setitem__(obj, name, v)
    return obj


def half_io(sample, model_output):
    """Both float16 or both bfloat16: the kernel reads and writes them directly (its arithmetic is
    float32, as diffusers' upcast), with no upcast copies around the launch."""
    return sample.dtype == model_output.dtype and sample.dtype in (torch.float16, torch.bfloat16)


def as_dtype(t, dtype):
    """``t.to(dtype)``, skipping the call when it is already that dtype (a no-op ``to`` still costs ~1 µs)."""
    return t if t.dtype == dtype else t.to(dtype)


@torch.compiler.assume_constant_result
def _traced_backend(device_type):
    """The pygen backend for ``device_type``, read once while torch.compile traces (a constant there)."""
    return _backend.resolve(torch.device(device_type))


# the value of a scheduler's key tensor before its Philox key is drawn (default_seed() is never negative)
UNDRAWN_KEY = -1


def draw_key(key_t):
    """The Philox key held by the 0-d int64 CPU tensor ``key_t``, drawn from torch's global RNG
    (``default_seed()``) and stored there the first time it is needed."""
    key = int(key_t)
    if key == UNDRAWN_KEY:
        key = default_seed()
        key_t.fill_(key)
    return key


@torch.library.custom_op("pygen_diffusers::keyed_step_out",
                         mutates_args=("step_index", "history", "out", "pred_x0", "key"))
def _keyed_step_out(x: torch.Tensor, model_out: torch.Tensor, coeffs: torch.Tensor, step_index: torch.Tensor,
                    history: Optional[torch.Tensor], noise: Optional[torch.Tensor], out: torch.Tensor,
                    pred_x0: Optional[torch.Tensor], key: torch.Tensor, stream: int, row_seeds: Optional[torch.Tensor],
                    clamp: float, advance: bool, triton: bool) -> None:
    """``pygen::sampler_step_out`` with the Philox key as a 0-d int64 CPU tensor (read on the host,
    no device sync). Used under torch.compile only: an int key would be specialized by dynamo, and
    every ``set_timesteps`` (a new key) would compile the loop again. A key not drawn yet
    (``UNDRAWN_KEY``) is drawn here, at run time, and written back to the scheduler's key tensor."""
    op = torch.ops.pygen.sampler_step_out_triton.default if triton else torch.ops.pygen.sampler_step_out.default
    op(x, model_out, coeffs, step_index, history, noise, out, pred_x0, draw_key(key), stream, row_seeds, clamp,
       advance)


@_keyed_step_out.register_fake
def _(*args):
    return None


def _keyed_launcher(triton):
    def launch(x, model_out, coeffs, step_index, history, noise, out, pred_x0, key, stream, row_seeds, clamp,
               advance):
        torch.ops.pygen_diffusers.keyed_step_out(x, model_out, coeffs, step_index, history, noise, out, pred_x0,
                                                 key, stream, row_seeds, clamp, advance, triton)

    return launch


def step_launcher(cache, device):
    """The ``sampler_step_out`` launcher for ``device``: cached per device in eager mode; under
    torch.compile the custom op itself (``pygen::sampler_step_out``, or its ``_triton`` twin when
    the Triton backend is selected), whose fake implementation lets the step trace into one graph
    (the eager launchers call Triton kernels / the torch reference directly, which do not trace)."""
    if torch.compiler.is_compiling():  # takes the key as a tensor (FusedSchedulerMixin._pygen_key)
        return _keyed_launcher(_traced_backend(device.type) == "triton")
    launch = cache.get(device)
    if launch is None:
        launch = cache[device] = resolve_step_launcher(device)
    return launch


class MissingTimestepError(ValueError, IndexError):
    """A timestep that is not in ``scheduler.timesteps`` (an IndexError too: what stock raises)."""


def _absent(name):
    """A class attribute that reads as missing (``hasattr`` False), for a method the stock class lacks."""
    def get(self):
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r} (nor has its diffusers namesake)")

    return property(get)


class FusedSchedulerMixin:
    """Device coefficient table + device step index + one fused launch per ``step()``."""

    # what a timestep missing from self.timesteps means: "raise" (stock: IndexError) or "last"
    # (stock DPM-Solver / UniPC: the last step)
    _pygen_missing_timestep = "raise"

    def __init_subclass__(cls, **kwargs):
        """A class with a stock diffusers base gets that base's ``set_timesteps`` signature and doc
        (diffusers' ``retrieve_timesteps`` reads the signature), and no ``add_noise`` where the stock
        class has none."""
        super().__init_subclass__(**kwargs)
        stock = next((c for c in cls.__mro__ if c.__module__.startswith("diffusers.")), None)
        if stock is None:
            return
        if cls.set_timesteps is stock.set_timesteps:  # (not when a class on the way overrides it)
            @functools.wraps(stock.set_timesteps)
            def set_timesteps(self, *args, **kwargs):
                return FusedSchedulerMixin._pygen_set_timesteps(self, stock, *args, **kwargs)

            cls.set_timesteps = set_timesteps
        if not hasattr(stock, "add_noise") and getattr(cls, "add_noise", None) is FusedSchedulerMixin.add_noise:
            cls.add_noise = _absent("add_noise")

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """diffusers' ``extract_init_dict`` with the ``pygen_noise`` key (a keyword of ``from_config``,
        or saved in the config) kept as a config entry instead of an unexpected constructor argument."""
        config_dict = dict(config_dict)
        mode = kwargs.pop("pygen_noise", None)
        saved = config_dict.pop("pygen_noise", None)
        init_dict, unused, hidden = super().extract_init_dict(config_dict, **kwargs)
        mode = saved if mode is None else mode
        if mode is not None:
            if mode not in NOISE_MODES:
                raise ValueError(f"pygen_noise must be one of {NOISE_MODES}, got {mode!r}")
            hidden["pygen_noise"] = mode  # from_config registers these to the config
        return init_dict, unused, hidden

    # --- to implement in the subclass -------------------------------------
    def _pygen_rows(self):
        """float64 CPU tensor (K, 8 + H): row i holds the coefficients of the i-th step()."""
        raise NotImplementedError

    # --- set-up ------------------------------------------------------------
    def _pygen_set_timesteps(self, stock, *args, **kwargs):
        out = stock.set_timesteps(self, *args, **kwargs)
        self._pygen_prepare()
        if self._pygen_noisy and getattr(self.config, "pygen_noise", None) != "generator":
            self._pygen_key()  # the key of this schedule's in-kernel noise, drawn now (outside the loop)
        if self._pygen_index0 is not None:  # the tables the loop reads, on the timesteps' device now
            self._pygen_warm(self._pygen_index0.device)
        return out

    def _pygen_prepare(self):
        rows = self._pygen_rows()
        if rows.dim() != 2 or rows.shape[1] < COL_HIST:
            raise RuntimeError(f"{type(self).__name__}._pygen_rows() must return (K, 8 + H), got {tuple(rows.shape)}")
        self._pygen_table64 = rows.to(torch.float64).contiguous()
        self._pygen_tables = {}      # (device, dtype) -> table on that device
        self._pygen_index = None     # device step index, set at the first step()
        self._pygen_history = None
        self._pygen_seed = None      # the Philox key, drawn at the first in-kernel noise (_pygen_key)
        # whether a row draws in-kernel noise: tables without noise launch with key 0, so torch.compile
        # (which specializes on the int key) reuses its graphs across set_timesteps. A NaN noise
        # coefficient (a row that must come out NaN, e.g. Heun's padding row) gives NaN whatever the key.
        s_col = self._pygen_table64[:, COL_S]
        self._pygen_noisy = bool(((s_col != 0) & ~s_col.isnan()).any())
        # the key for torch.compile: drawn in the compiled step when still UNDRAWN_KEY (draw_key)
        self._pygen_key_t = torch.full((), UNDRAWN_KEY, dtype=torch.int64)
        self._pygen_launchers = {}
        self._pygen_ts = {}          # device -> self.timesteps there (for the sync-free lookup)
        ts = getattr(self, "timesteps", None)
        self._pygen_first_index = {}  # timestep value -> the step index diffusers' rule gives it
        self._pygen_ts_host = None   # self.timesteps on the CPU (stock's lookup rule, _pygen_host_match)
        self._pygen_by_pos = []      # position in self.timesteps -> the same
        self._pygen_index0 = None    # the loop's step index, made here at 0
        if isinstance(ts, torch.Tensor) and ts.dim() == 1:
            self._pygen_ts_host = ts.detach().to("cpu")  # one host read, at set-up
            values = self._pygen_ts_host.tolist()
            where = {}
            for k, v in enumerate(values):
                where.setdefault(v, []).append(k)
            self._pygen_first_index = {v: (p[1] if len(p) > 1 else p[0]) for v, p in where.items()}
            self._pygen_by_pos = [self._pygen_first_index[v] for v in values]  # position -> rule index
            self._pygen_index0 = torch.zeros(1, dtype=torch.int64, device=ts.device)

    def _pygen_warm(self, device):
        """Upload what the loop reads for float32 accumulation to ``device`` (at set_timesteps)."""
        self._pygen_table(device, torch.float32)

    def _pygen_table(self, device, dtype):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        key = (device, acc)
        table = self._pygen_tables.get(key)
        if table is None:
            host = self._pygen_table64.to(dtype=acc)
            if torch.device(device).type == "cuda":
                # pinned + non_blocking: the first step's upload does not wait for the device
                host = host.pin_memory()
                self._pygen_tables[("pinned",) + key] = host  # alive until the copy has run
                table = host.to(device=device, non_blocking=True)
            else:
                table = host.to(device=device)
            self._pygen_tables[key] = table
        return table

    # --- step index ----------------------------------------------------------
    @property
    def step_index(self):
        index = getattr(self, "_pygen_index", None)
        if index is None:
            return getattr(self, "_step_index", None)
        if index.numel() == 1:
            return int(index.item())  # a host read, only when user code asks
        return index.tolist()

    def _pygen_lookup(self, timestep, device):
        """Index of ``timestep`` in ``self.timesteps``, on the device (diffusers' second-match rule)."""
        ts = self._pygen_ts.get(device)
        if ts is None:
            ts = self._pygen_ts[device] = self.timesteps.to(device)
        t = torch.as_tensor(timestep, device=device).to(ts.dtype)
        rows = t.reshape(-1)
        match = ts[None, :] == rows[:, None]                      # (R, K)
        pos = torch.arange(ts.shape[0], device=device)
        count = match.sum(dim=1)
        first = torch.where(match, pos, ts.shape[0]).amin(dim=1)
        second = torch.where(match & (pos > first[:, None]), pos, ts.shape[0]).amin(dim=1)
        idx = torch.where(count > 1, second, first)
        if self._pygen_missing_timestep == "last":
            idx = torch.where(idx >= ts.shape[0], ts.shape[0] - 1, idx)
        return idx.to(torch.int64)  # K (out of range -> NaN rows in the kernel) when not found

    def _pygen_host_first(self, timestep):
        """The step index of a first step at ``timestep`` when it is known on the host with no device
        read (a Python number, a CPU tensor, or an element of ``self.timesteps`` itself), else None
        (and always None under torch.compile, which traces the device lookup)."""
        if isinstance(timestep, bool) or torch.compiler.is_compiling():
            return None
        if isinstance(timestep, (int, float)):
            first = self._pygen_first_index.get(timestep)
            return self._pygen_host_match(timestep) if first is None else first
        if not isinstance(timestep, torch.Tensor) or timestep.numel() != 1:
            return None
        ts = self.timesteps
        if timestep.device == ts.device and timestep.dtype == ts.dtype and ts.dim() == 1 and ts.is_contiguous():
            k, rem = divmod(timestep.data_ptr() - ts.data_ptr(), ts.element_size())
            if not rem and 0 <= k < len(self._pygen_by_pos):  # an element of self.timesteps: no read at all
                return self._pygen_by_pos[k]
        if timestep.device.type == "cpu":
            first = self._pygen_first_index.get(timestep.item())  # a host tensor: no device involved
            return self._pygen_host_match(timestep) if first is None else first
        return None

    def _pygen_host_match(self, timestep):
        """Stock's lookup on the host copy of ``self.timesteps``: ``(timesteps == timestep).nonzero()``
        with its type promotion (a float close to a float32 timestep, or a float against int64
        timesteps, matches as it does there), the second match when there are several; None if none.
        Only for a first step whose value missed the exact-value table (no device involved)."""
        ts = getattr(self, "_pygen_ts_host", None)
        if ts is None:
            return None
        hits = (ts == timestep).nonzero()
        if len(hits) == 0:
            return None
        return int(hits[1] if len(hits) > 1 else hits[0])

    @staticmethod
    def _pygen_host_known(timestep):
        """Whether ``timestep``'s value is on the host (a number or a one-element CPU tensor)."""
        if torch.compiler.is_compiling():
            return False
        if isinstance(timestep, (int, float)) and not isinstance(timestep, bool):
            return True
        return isinstance(timestep, torch.Tensor) and timestep.numel() == 1 and timestep.device.type == "cpu"

    def _pygen_missing(self, timestep):
        """The step index of a host-known timestep that is not in ``self.timesteps``: the last step
        (``_pygen_missing_timestep = "last"``, stock DPM-Solver / UniPC) or a clear error."""
        if self._pygen_missing_timestep == "last":
            return len(self.timesteps) - 1
        value = timestep.item() if isinstance(timestep, torch.Tensor) else timestep
        raise MissingTimestepError(f"timestep {value!r} is not in {type(self).__name__}.timesteps (set by set_timesteps); "
                               "pass one of scheduler.timesteps")

    def _pygen_step_index(self, timestep, sample):
        """The device step index for this step(): (1,) or one per batch row."""
        if getattr(self, "_pygen_table64", None) is None:
            raise ValueError("call set_timesteps() before step()")
        per_row = isinstance(timestep, torch.Tensor) and timestep.dim() == 1 and timestep.numel() > 1
        if per_row:
            if timestep.shape[0] != sample.shape[0]:
                raise ValueError(f"timestep must be a scalar or have one entry per batch row ({sample.shape[0]}), "
                                 f"got shape {tuple(timestep.shape)}")
            if self._pygen_index is not None and self._pygen_index.numel() == sample.shape[0]:
                return self._pygen_index
            self._pygen_index = self._pygen_lookup(timestep, sample.device).contiguous()
            return self._pygen_index
        if self._pygen_index is None:
            first = int(self.begin_index) if self.begin_index is not None else self._pygen_host_first(timestep)
            if first is None and self._pygen_host_known(timestep):
                first = self._pygen_missing(timestep)
            index0 = self._pygen_index0
            if first == 0 and index0 is not None and index0.device == sample.device:
                self._pygen_index, self._pygen_index0 = index0, None  # made at set_timesteps: no launch
            elif first is not None:
                self._pygen_index = torch.full((1,), first, dtype=torch.int64, device=sample.device)
            else:
                self._pygen_index = self._pygen_lookup(timestep, sample.device)
        return self._pygen_index

    def set_begin_index(self, begin_index=0):
        super().set_begin_index(begin_index)
        self._pygen_index = None

    # --- add_noise (img2img / inpainting) ------------------------------------------
    # Opt-in per class: "ve" (x + sigma·noise: Euler family, Heun, LMS) or "alpha_sigma"
    # (alpha_t·x + sigma_t·noise from ``_sigma_to_alpha_sigma_t``: DPM-Solver, UniPC). Other
    # classes keep the stock add_noise (DDPM/DDIM gather alphas_cumprod by timestep on the device).
    _pygen_add_noise_kind = None

    def add_noise(self, original_samples, noise, timesteps):
        """diffusers' add_noise with the step index found on the device (no host sync)."""
        kind = self._pygen_add_noise_kind
        if kind is None or getattr(self, "_pygen_table64", None) is None or not isinstance(timesteps, torch.Tensor):
            return super().add_noise(original_samples, noise, timesteps)
        dev, dtype = original_samples.device, original_samples.dtype
        key = ("add_noise", dev, dtype)
        sig = self._pygen_tables.get(key)
        if sig is None:
            sig = self._pygen_tables[key] = self.sigmas.to(device=dev, dtype=dtype)
        num = timesteps.reshape(-1).shape[0]
        if self.begin_index is None:  # training / no begin index: look each timestep up
            idx = self._pygen_lookup(timesteps, dev)  # (DPM-Solver/UniPC: an unknown timestep is the last step)
        elif self._pygen_index is not None:  # inpainting: after the first step
            idx = self._pygen_index.expand(num) if self._pygen_index.numel() == 1 else self._pygen_index
        else:  # img2img: before the first step
            idx = torch.full((num,), int(self.begin_index), dtype=torch.int64, device=dev)
        sigma = sig.index_select(0, idx.clamp(0, sig.shape[0] - 1))
        sigma = torch.where(idx < sig.shape[0], sigma, torch.full_like(sigma, float("nan")))
        sigma = sigma.view((-1,) + (1,) * (original_samples.dim() - 1))
        if kind == "ve":
            return original_samples + noise * sigma
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(sigma)
        return alpha_t * original_samples + sigma_t * noise

    # --- noise ---------------------------------------------------------------
    def _pygen_noise_mode(self):
        mode = getattr(self.config, "pygen_noise", None) or "auto"
        if mode not in NOISE_MODES:
            raise ValueError(f"config pygen_noise must be one of {NOISE_MODES}, got {mode!r}")
        return mode

    def _pygen_noise(self, model_output, generator, variance_noise=None):
        """Explicit noise for this step, or None to draw it in the kernel."""
        if variance_noise is not None:
            if generator is not None:
                raise ValueError("Cannot pass both generator and variance_noise. Please make sure that either "
                                 "`generator` or `variance_noise` stays `None`.")
            return variance_noise
        mode = self._pygen_noise_mode()
        if mode == "philox" or (mode == "auto" and generator is None):
            return None
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                            dtype=model_output.dtype)

    # --- the fused launch ----------------------------------------------------
    def _pygen_key(self, noisy=None):
        """The Philox key passed to the fused step: 0 when no row draws in-kernel noise (``noisy``:
        default, whether this schedule's table does); under torch.compile a 0-d int64 CPU tensor
        (see ``_keyed_step_out``). The key is drawn from torch's global RNG the first time a
        noisy launch asks for it (one CPU draw, no device involved)."""
        if noisy is None:
            noisy = getattr(self, "_pygen_noisy", True)
        if torch.compiler.is_compiling():  # (never reads the int key: no guard on its value)
            return self._pygen_key_t if noisy else torch.zeros((), dtype=torch.int64)
        if not noisy:
            return 0
        seed = self._pygen_seed
        if seed is None:
            seed = self._pygen_seed = draw_key(self._pygen_key_t)
        return seed

    def _pygen_history_for(self, x, num_hist, dtype=None):
        """The history ring (num_hist, *x.shape) in ``dtype`` (default x's), zeroed when first needed or
        when its shape, dtype or device changes; None for tables without history columns."""
        if not num_hist:
            return None
        dtype = x.dtype if dtype is None else dtype
        h = self._pygen_history
        if h is None or h.shape[1:] != x.shape or h.dtype != dtype or h.device != x.device:
            h = self._pygen_history = torch.zeros((num_hist,) + tuple(x.shape), dtype=dtype, device=x.device)
        return h

    def _pygen_launch(self, model_output, sample, index, noise=None, *, clamp=0.0, advance=True, out_dtype=None,
                      want_pred=True, table=None, pred_dtype=None, hist_dtype=None):
        """One fused step: returns (prev_sample, pred_original_sample) in ``out_dtype`` (default: sample's);
        with ``want_pred=False`` the kernel skips pred_original_sample (returned as None). ``table``:
        the device table to use (default: this schedule's table). ``pred_dtype`` / ``hist_dtype``:
        float32 for a float16/bfloat16 sample makes the kernel write the predicted x0 / keep its
        history unrounded in float32."""
        if isinstance(model_output, torch.Tensor) and model_output.dtype != sample.dtype:
            model_output = model_output.to(sample.dtype)  # diffusers mixes dtypes freely (fp16 model, fp32 sample)
        check_model_out(model_output, sample, "model_output")
        sample = sample.contiguous()
        model_output = model_output.contiguous()
        if table is None:
            table = self._pygen_table(sample.device, sample.dtype)
        history = self._pygen_history_for(sample, table.shape[1] - COL_HIST, hist_dtype)
        if noise is not None:
            noise = noise.to(device=sample.device, dtype=sample.dtype).contiguous()
        launch = step_launcher(self._pygen_launchers, sample.device)
        prev = torch.empty_like(sample)
        pred = torch.empty_like(sample, dtype=pred_dtype) if want_pred else None
        single = index.numel() == 1
        launch(sample, model_output, table, index, history, noise, prev, pred,
               self._pygen_key(), 0, None, float(clamp), bool(advance and single))
        if advance and not single:
            index.add_(1)
        if out_dtype is not None and out_dtype != prev.dtype:
            prev, pred = prev.to(out_dtype), (pred.to(out_dtype) if pred is not None else None)
        return prev, pred

    def _pygen_apply(self, table, sample, index):
        """``a·sample`` with ``a`` read from column A of ``table`` at the device ``index`` (one launch of
        the step op: no noise, no history, the index not advanced), in sample's dtype."""
        if not isinstance(sample, torch.Tensor) or not sample.is_floating_point():
            raise TypeError(f"sample must be a floating-point torch.Tensor, got "
                            f"{type(sample).__name__ if not isinstance(sample, torch.Tensor) else sample.dtype}")
        sample = sample.contiguous()
        out = torch.empty_like(sample)
        step_launcher(self._pygen_launchers, sample.device)(sample, sample, table, index, None, None, out, None,
                                                            self._pygen_key(noisy=False), 0, None, 0.0, False)
        return out

    @staticmethod
    def _pygen_output(cls, prev_sample, pred_original_sample, return_dict, **extra):
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return fast_output(cls, prev_sample=prev_sample, pred_original_sample=pred_original_sample, **extra)


class OrderTablesMixin:
    """For multistep schedulers whose order at a step depends on a host counter (DPM-Solver, UniPC):
    one table per counter value (``self._pygen_all_tables``), each cached per device, and the
    thresholded predicted x0 from per-step (cx, cm) rows (``self._pygen_pre64``), device ops only."""

    def _pygen_prepare(self):
        super()._pygen_prepare()
        self._pygen_dev_tables = {}
        self._pygen_dev_pre = {}

    def _pygen_warm(self, device):  # (the loop reads these tables only, never _pygen_table's)
        for lon in range(len(self._pygen_all_tables)):
            self._pygen_dev_table(lon, device, torch.float32)

    def _pygen_dev_table(self, lon, device, acc):
        key = (lon, device, acc)
        t = self._pygen_dev_tables.get(key)
        if t is None:
            t = self._pygen_dev_tables[key] = self._pygen_all_tables[lon].to(device=device, dtype=acc).contiguous()
        return t

    def _pygen_threshold_x0(self, model_output, sample, idx):
        """Thresholded predicted x0 (device ops only: table gather, quantile, clamp)."""
        key = (sample.device, sample.dtype)
        pre = self._pygen_dev_pre.get(key)
        if pre is None:
            pre = self._pygen_dev_pre[key] = self._pygen_pre64.to(device=sample.device, dtype=sample.dtype)
        n = pre.shape[0]
        coef = pre.index_select(0, idx.clamp(0, n - 1))
        coef = torch.where(((idx >= 0) & (idx < n))[:, None], coef, torch.full_like(coef, float("nan")))
        view = (-1,) + (1,) * (sample.dim() - 1)
        x0 = coef[:, 0].view(view) * sample + coef[:, 1].view(view) * model_output.to(sample.dtype)
        return self._threshold_sample(x0)
