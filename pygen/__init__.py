"""pygen: fused kernels for the math of generative models.

Public API (see README.md):
    pygen.randn, pygen.q_sample, pygen.reparameterize, pygen.langevin_step,
    pygen.sampler_step, pygen.step_coefficients, pygen.sample (every sampler), pygen.schedules,
    pygen.models (GaussianMixture, clot, ring), pygen.metrics, pygen.sde (score-SDE samplers),
    pygen.mcmc (ULA, MALA, HMC, replica exchange), pygen.kdiffusion (k-diffusion-compatible samplers),
    pygen.attention (fused flash attention + dispatcher vs SDPA), pygen.adaln_modulate,
    pygen.gated_residual, pygen.group_norm, pygen.timestep_embedding, pygen.nn (Attention, DiTBlock,
    UNetAttentionBlock), pygen.losses (diffusion/DSM/VAE/EBM training losses),
    pygen.fused_diffusion_mse, pygen.reparameterize_kl,
    pygen.backends(), pygen.use_backend(name)
"""
import os as _os

# Installed, ``kernels/`` ships as ``pygen/kernels``. In a source checkout it
# sits beside ``pygen/``; let ``pygen.kernels`` resolve to it there too.
_here = _os.path.dirname(_os.path.abspath(__file__))
if not _os.path.isdir(_os.path.join(_here, "kernels")):
    _src_root = _os.path.dirname(_here)
    if _os.path.isfile(_os.path.join(_src_root, "kernels", "philox.py")):
        __path__.append(_src_root)  # noqa: F821  (package __path__)

from pygen import _extension  # noqa: E402,F401  (loads torch.ops.pygen.* if built)
from pygen._backend import backends, use_backend  # noqa: E402
from pygen.ops import _registry  # noqa: E402,F401  (schemas fallback, fakes, triton ops)
from pygen.samplers import sample  # noqa: E402,F401  (imports pygen.kdiffusion)
from pygen import distributed, kdiffusion, mcmc, metrics, models, schedules, sde  # noqa: E402,F401
from pygen import losses  # noqa: E402,F401  (training losses: diffusion, DSM, VAE, EBM)
from pygen.ops.attention import attention, attention_reference  # noqa: E402,F401
from pygen.ops.forward import *  # noqa: E402,F401,F403  (q_sample, reparameterize)
from pygen.ops.langevin import *  # noqa: E402,F401,F403  (langevin_step, langevin_snr_step)
from pygen.ops.loss import *  # noqa: E402,F401,F403  (fused_diffusion_mse, reparameterize_kl)
from pygen.ops.mcmc import *  # noqa: E402,F401,F403  (leapfrog_, mh_select_)
from pygen.ops.norm import *  # noqa: E402,F401,F403  (adaln_modulate, gated_residual, group_norm, timestep_embedding)
from pygen.ops.random import randn  # noqa: E402
from pygen.ops.schedule import *  # noqa: E402,F401,F403  (step_coefficients)
from pygen.ops.step import *  # noqa: E402,F401,F403  (sampler_step)
from pygen import nn  # noqa: E402,F401  (modules on the ops above: Attention, DiTBlock, UNetAttentionBlock, ...)

__version__ = "0.1.0"
