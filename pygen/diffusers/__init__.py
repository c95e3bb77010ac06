"""pygen.diffusers: fused, sync-free drop-ins for diffusers schedulers.

``pipe.scheduler = pygen.diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)``,
or ``pygen.diffusers.patch(pipe)``. Each class subclasses its diffusers namesake (same
constructor, config, attributes and methods) and replaces ``step()`` with one fused pygen
launch on a coefficient table built at ``set_timesteps``; see _base.py. Needs diffusers
(``pip install pygen[diffusers]``).
"""
from pygen.diffusers._base import NOISE_MODES, FusedSchedulerMixin  # noqa: F401
from pygen.diffusers.ddim import DDIMScheduler  # noqa: F401
from pygen.diffusers.ddpm import DDPMScheduler  # noqa: F401
from pygen.diffusers.dpmsolver import DPMSolverMultistepScheduler  # noqa: F401
from pygen.diffusers.euler import EulerDiscreteScheduler  # noqa: F401
from pygen.diffusers.euler_ancestral import EulerAncestralDiscreteScheduler  # noqa: F401
from pygen.diffusers.flow_match import FlowMatchEulerDiscreteScheduler  # noqa: F401
from pygen.diffusers.heun import HeunDiscreteScheduler  # noqa: F401
from pygen.diffusers.lms import LMSDiscreteScheduler  # noqa: F401
from pygen.diffusers.unipc import UniPCMultistepScheduler  # noqa: F401

_CLASSES = (DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
            HeunDiscreteScheduler, LMSDiscreteScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler,
            FlowMatchEulerDiscreteScheduler)
__all__ = [c.__name__ for c in _CLASSES] + ["FusedSchedulerMixin", "NOISE_MODES", "SCHEDULERS", "patch", "unpatch"]

# stock class name -> fused class
SCHEDULERS = {cls.__name__: cls for cls in _CLASSES}


def fused_scheduler_for(scheduler):
    """The fused counterpart of a diffusers scheduler instance (same config), or None if pygen has none."""
    cls = SCHEDULERS.get(type(scheduler).__name__)
    if cls is None or isinstance(scheduler, FusedSchedulerMixin):
        return None
    return cls.from_config(scheduler.config)


def patch(pipe):
    """Swap ``pipe.scheduler`` for pygen's fused class with the same config; returns ``pipe``.

    The original scheduler is kept on the pipe (``pipe._pygen_original_scheduler``) for
    ``unpatch``. A scheduler pygen has no fused class for is left as it is (with a warning).
    """
    import warnings

    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None:
        raise TypeError(f"pipe must have a .scheduler (a diffusers pipeline), got {type(pipe).__name__}")
    if isinstance(scheduler, FusedSchedulerMixin):
        return pipe
    fused = fused_scheduler_for(scheduler)
    if fused is None:
        warnings.warn(f"pygen.diffusers has no fused {type(scheduler).__name__}; the pipeline keeps it. "
                      f"Fused: {', '.join(sorted(SCHEDULERS))}", stacklevel=2)
        return pipe
    pipe._pygen_original_scheduler = scheduler
    pipe.scheduler = fused
    return pipe


def unpatch(pipe):
    """Undo ``patch``: restore the original scheduler; returns ``pipe``."""
    original = getattr(pipe, "_pygen_original_scheduler", None)
    if original is not None:
        pipe.scheduler = original
        del pipe._pygen_original_scheduler
    return pipe
