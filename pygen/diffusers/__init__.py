"""pygen.diffusers: fused, sync-free drop-ins for diffusers schedulers.

``pipe.scheduler = pygen.diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)``.
Each class subclasses its diffusers namesake (same constructor, config, attributes and
methods) and replaces ``step()`` with one fused pygen launch; see _base.py.
Needs diffusers (``pip install pygen[diffusers]``).
"""
from pygen.diffusers._base import FusedSchedulerMixin, NOISE_MODES  # noqa: F401
from pygen.diffusers.euler import EulerDiscreteScheduler  # noqa: F401

__all__ = ["EulerDiscreteScheduler", "FusedSchedulerMixin", "NOISE_MODES"]
