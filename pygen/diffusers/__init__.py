"""pygen.diffusers: fused, sync-free drop-ins for diffusers schedulers, and a fused attention processor.

``pipe.scheduler = pygen.diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)``,
or ``pygen.diffusers.patch(pipe)``. Each class subclasses its diffusers namesake (same
constructor, config, attributes and methods) and replaces ``step()`` with one fused pygen
launch on a coefficient table built at ``set_timesteps``; see _base.py.

``model.set_attn_processor(pygen.diffusers.AttnProcessor())`` (diffusers' ``AttnProcessor2_0`` on
pygen.attention / pygen.group_norm; attention.py), or ``install_attn_processor(model)`` for models
without ``set_attn_processor`` (DiTTransformer2DModel); ``patch(pipe)`` also installs it on
``pipe.unet`` / ``pipe.transformer``. Needs diffusers (``pip install pygen[diffusers]``).
"""
import torch

from pygen.diffusers._base import NOISE_MODES, FusedSchedulerMixin  # noqa: F401
from pygen.diffusers.attention import AttnProcessor  # noqa: F401
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
__all__ = [c.__name__ for c in _CLASSES] + ["AttnProcessor", "FusedSchedulerMixin", "NOISE_MODES", "SCHEDULERS",
                                            "install_attn_processor", "patch", "restore_attn_processors", "unpatch"]

# pipeline components that get pygen's attention processor from ``patch``
ATTENTION_COMPONENTS = ("unet", "transformer")

# stock class name -> fused class
SCHEDULERS = {cls.__name__: cls for cls in _CLASSES}


def fused_scheduler_for(scheduler):
    """The fused counterpart of a diffusers scheduler instance (same config), or None if pygen has none."""
    cls = SCHEDULERS.get(type(scheduler).__name__)
    if cls is None or isinstance(scheduler, FusedSchedulerMixin):
        return None
    return cls.from_config(scheduler.config)


def install_attn_processor(model, processor=None):
    """Give every diffusers ``Attention`` layer of ``model`` that uses ``AttnProcessor2_0`` (or, after
    ``fuse_qkv_projections()``, ``FusedAttnProcessor2_0``) pygen's ``AttnProcessor`` (``processor``,
    default a new one; it uses the fused projections too); other processors (IP-adapter, added-KV,
    joint attention, custom ones) are left as they are. Works on any ``torch.nn.Module`` (also models
    without ``set_attn_processor``, e.g. DiTTransformer2DModel).

    Returns ``{module name: original processor}`` of the layers changed (empty if none), what
    ``restore_attn_processors(model, originals)`` puts back.
    """
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0, FusedAttnProcessor2_0

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a diffusers model), got {type(model).__name__}")
    processor = AttnProcessor() if processor is None else processor
    originals = {}
    for name, module in model.named_modules():
        if isinstance(module, Attention) and type(getattr(module, "processor", None)) in (AttnProcessor2_0,
                                                                                          FusedAttnProcessor2_0):
            originals[name] = module.processor
            module.set_processor(processor)
    return originals


def restore_attn_processors(model, originals):
    """Undo ``install_attn_processor``: put back the processors it returned."""
    for name, proc in originals.items():
        model.get_submodule(name).set_processor(proc)
    return model


def patch(pipe, attention=True):
    """Swap ``pipe.scheduler`` for pygen's fused class with the same config and, with ``attention``,
    install pygen's ``AttnProcessor`` on ``pipe.unet`` / ``pipe.transformer`` (the layers that use
    ``AttnProcessor2_0``); returns ``pipe``.

    The original scheduler and processors are kept on the pipe (``pipe._pygen_original_scheduler``,
    ``pipe._pygen_original_attn_processors``) for ``unpatch``. A scheduler pygen has no fused class
    for is left as it is (with a warning); the processors are installed all the same.
    """
    import warnings

    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None:
        raise TypeError(f"pipe must have a .scheduler (a diffusers pipeline), got {type(pipe).__name__}")
    if not isinstance(scheduler, FusedSchedulerMixin):
        fused = fused_scheduler_for(scheduler)
        if fused is None:
            warnings.warn(f"pygen.diffusers has no fused {type(scheduler).__name__}; the pipeline keeps it. "
                          f"Fused: {', '.join(sorted(SCHEDULERS))}", stacklevel=2)
        else:
            pipe._pygen_original_scheduler = scheduler
            pipe.scheduler = fused
    if attention:
        _patch_attention(pipe)
    return pipe


def _patch_attention(pipe):
    saved = dict(getattr(pipe, "_pygen_original_attn_processors", None) or {})
    processor = AttnProcessor()
    for component in ATTENTION_COMPONENTS:
        model = getattr(pipe, component, None)
        if not isinstance(model, torch.nn.Module):
            continue
        originals = install_attn_processor(model, processor)
        if originals:  # (patching twice: the second call finds nothing to replace)
            saved.setdefault(component, {}).update(originals)
    if saved:
        pipe._pygen_original_attn_processors = saved


def unpatch(pipe):
    """Undo ``patch``: restore the original scheduler and attention processors; returns ``pipe``."""
    original = getattr(pipe, "_pygen_original_scheduler", None)
    if original is not None:
        pipe.scheduler = original
        del pipe._pygen_original_scheduler
    processors = getattr(pipe, "_pygen_original_attn_processors", None)
    if processors is not None:
        for component, originals in processors.items():
            restore_attn_processors(getattr(pipe, component), originals)
        del pipe._pygen_original_attn_processors
    return pipe
