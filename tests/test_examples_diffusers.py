"""pygen.diffusers.patch() on real diffusers pipelines end to end (CPU, tiny random models, no download).

- DDPMPipeline / DDIMPipeline with a tiny UNet2DModel built from a config: stock vs patched runs with
  the same generator give matching images; the patched scheduler is the fused class; unpatch restores
  the original scheduler object.
- The same through DDPMPipeline with its scheduler swapped for Euler / EulerAncestral / DPM-Solver (the
  pipeline's loop calls step(model_output, t, image, generator=...), which these accept; UniPC does
  not take a generator, so it is left to the example).
- examples/diffusers_patch.py runs as a subprocess (smoke test) and reports a small difference.
"""
import os
import re
import subprocess
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
import pygen  # noqa: E402
import pygen.diffusers  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "diffusers_patch.py")


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()


def run(pipe, steps, seed=1234, **kw):
    """(images, final unclamped sample from the last scheduler.step) of one seeded run."""
    generator = torch.Generator("cpu").manual_seed(seed)
    scheduler, last = pipe.scheduler, []
    step = scheduler.step

    def recording_step(*args, **kwargs):
        out = step(*args, **kwargs)
        last[:] = [out.prev_sample.clone()]
        return out
    scheduler.step = recording_step  # instance attribute: the pipeline's loop calls it
    try:
        images = pipe(batch_size=2, generator=generator, num_inference_steps=steps, output_type="np", **kw).images
    finally:
        del scheduler.step
    return images, last[0]


def check_pipeline(pipe, steps, require_unclamped=True, **kw):
    original = pipe.scheduler
    stock, stock_x = run(pipe, steps, **kw)
    # The scheduler alone: these 1e-5 comparisons of whole pipelines would also see fp32 reordering in
    # pygen's attention (its processor is checked against stock in tests/test_diffusers_attention.py).
    assert pygen.diffusers.patch(pipe, attention=False) is pipe
    fused_cls = pygen.diffusers.SCHEDULERS[type(original).__name__]
    assert type(pipe.scheduler) is fused_cls
    assert isinstance(pipe.scheduler, type(original))  # subclass of the stock class
    assert dict(pipe.scheduler.config) == dict(original.config)
    patched, patched_x = run(pipe, steps, **kw)
    assert pygen.diffusers.unpatch(pipe) is pipe
    assert pipe.scheduler is original
    again, _ = run(pipe, steps, **kw)

    assert stock.shape == patched.shape == (2, 8, 8, 3)
    if require_unclamped:
        # The pipeline clamps to [0, 1]: most pixels must not be saturated, or the image comparison says little.
        inside = ((patched > 1e-3) & (patched < 1 - 1e-3)).mean()
        assert inside > 0.5, f"only {inside:.0%} of pixels are unclamped"
    assert (stock == again).all()  # stock is deterministic given the generator
    torch.testing.assert_close(torch.from_numpy(patched), torch.from_numpy(stock), rtol=1e-5, atol=1e-5)
    # The final sample before the pipeline's clamp matches too (relative to its scale).
    scale = stock_x.abs().max().item()
    assert torch.isfinite(stock_x).all() and scale > 0
    torch.testing.assert_close(patched_x, stock_x, rtol=1e-5, atol=1e-5 * max(scale, 1.0))
    # ...and the generator matters (a different seed gives a different result).
    _, other_x = run(pipe, steps, seed=99, **kw)
    assert (other_x - stock_x).abs().max() > 1e-2 * scale


def test_ddpm_pipeline_patch_matches_stock():
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    pipe = diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    check_pipeline(pipe, steps=6)  # 6 of 1000 train steps (spaced), noise drawn from the generator each step


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_pipeline_patch_matches_stock(eta):
    # DDIMPipeline.__init__ rebuilds its scheduler from the config, so patch after construction.
    pipe = diffusers.DDIMPipeline(unet=tiny_unet(), scheduler=diffusers.DDIMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    check_pipeline(pipe, steps=5, eta=eta)


@pytest.mark.parametrize("name, config", [
    ("EulerDiscreteScheduler", {}),
    ("DPMSolverMultistepScheduler", {"solver_order": 2}),
    ("EulerAncestralDiscreteScheduler", {}),  # draws noise from the generator each step
])
def test_ddpm_pipeline_with_swapped_scheduler(name, config):
    # DDPMPipeline's loop does not apply init_noise_sigma/scale_model_input; the run is not a good
    # sampler for these classes but exercises their step() inside a real pipeline, stock vs fused.
    scheduler = getattr(diffusers, name)(num_train_timesteps=1000, **config)
    pipe = diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    # Unscaled noise saturates the clamped image here: compare the final samples only.
    check_pipeline(pipe, steps=5, require_unclamped=False)


def test_patch_is_idempotent_and_unpatch_without_patch_is_noop():
    pipe = diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=diffusers.DDPMScheduler())
    original = pipe.scheduler
    assert pygen.diffusers.unpatch(pipe).scheduler is original
    pygen.diffusers.patch(pipe)
    fused = pipe.scheduler
    pygen.diffusers.patch(pipe)
    assert pipe.scheduler is fused
    pygen.diffusers.unpatch(pipe)
    assert pipe.scheduler is original


def run_example(*args):
    env = dict(os.environ)
    # The example imports the same pygen this test imported (in-place build or installed package).
    pygen_root = os.path.dirname(os.path.dirname(os.path.abspath(pygen.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([pygen_root] + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.run([sys.executable, EXAMPLE, *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=ROOT)


def test_example_help():
    proc = run_example("--help")
    assert proc.returncode == 0, proc.stderr
    for option in ("--steps", "--scheduler", "--device"):
        assert option in proc.stdout


@pytest.mark.parametrize("scheduler", ["euler", "dpmsolver"])
def test_example_runs_and_matches(scheduler):
    proc = run_example("--steps", "4", "--scheduler", scheduler, "--batch", "1", "--device", "cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "pygen.diffusers" in proc.stdout  # the patched run used the fused class
    match = re.search(r"^max_abs_diff=(\S+)$", proc.stdout, re.M)
    assert match, proc.stdout
    assert float(match.group(1)) < 1e-4, proc.stdout


def test_example_rejects_bad_args():
    proc = run_example("--steps", "0")
    assert proc.returncode != 0 and "--steps" in proc.stderr
