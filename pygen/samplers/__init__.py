"""Sampler loops built from pygen's fused ops (see program.py)."""
from pygen.samplers.program import StepProgram  # noqa: F401
