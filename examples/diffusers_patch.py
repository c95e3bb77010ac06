"""pygen.diffusers.patch() on a text-to-image pipeline built from tiny random configs (CPU or CUDA).

Builds a tiny latent text-to-image pipeline with no network access and no weight download:
a UNet2DConditionModel and an AutoencoderKL from small configs with random weights, and random
text embeddings fed as ``prompt_embeds`` / ``negative_prompt_embeds`` (classifier-free guidance).
It runs once with the stock diffusers scheduler, then ``pygen.diffusers.patch(pipe)`` swaps in
pygen's fused scheduler with the same config, runs again with an identically seeded generator,
prints the max abs difference of the two images and the time per run, and ``unpatch``es.

Pipelines (``--pipeline``):
  sd    diffusers' StableDiffusionPipeline (needs ``transformers``: a tiny random CLIPTextModel is
        built from a CLIPTextConfig; no tokenizer, the prompt is given as ``prompt_embeds``).
  tiny  a minimal DiffusionPipeline defined below with the same denoising loop as Stable
        Diffusion (scale_model_input, CFG, scheduler.step, VAE decode); needs only diffusers.
  auto  (default) sd if transformers is importable, else tiny.

    python examples/diffusers_patch.py --steps 10 --scheduler dpmsolver --device cpu

The last line printed is ``max_abs_diff=<float>`` (the smoke test parses it).
"""
import argparse
import importlib.util
import inspect
import os
import sys
import time

import torch

SCHEDULER_NAMES = {
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "heun": "HeunDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
}

# Stable-Diffusion-like scheduler config (scaled_linear betas, epsilon prediction).
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                        beta_schedule="scaled_linear", prediction_type="epsilon")

TEXT_DIM = 32      # cross-attention / text embedding width
TEXT_LEN = 7       # tokens per prompt


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Schedulers: " + ", ".join(f"{k} ({v})" for k, v in SCHEDULER_NAMES.items()))
    p.add_argument("--steps", type=int, default=8, help="denoising steps (default 8)")
    p.add_argument("--scheduler", choices=sorted(SCHEDULER_NAMES), default="euler",
                   help="stock diffusers scheduler to start from (default euler)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--pipeline", choices=("auto", "sd", "tiny"), default="auto",
                   help="sd = StableDiffusionPipeline (needs transformers), tiny = built-in loop (default auto)")
    p.add_argument("--batch", type=int, default=2, help="images per run (default 2)")
    p.add_argument("--size", type=int, default=32, help="image side in pixels; latents are size/4 (default 32)")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default 5.0)")
    p.add_argument("--seed", type=int, default=0, help="seed for the weights and the generator (default 0)")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.size < 4 or args.size % 4:
        p.error("--size must be a positive multiple of 4")
    return args


def tiny_unet_and_vae(size):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=size // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=4)
    vae = AutoencoderKL(  # 3 blocks -> downsampling factor 4
        in_channels=3, out_channels=3, latent_channels=4, sample_size=size, layers_per_block=1,
        block_out_channels=(8, 8, 16), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
    return unet.eval(), vae.eval()


def build_tiny_pipeline(scheduler, size):
    from diffusers import DiffusionPipeline
    from diffusers.utils.torch_utils import randn_tensor

    class TinyTextToImagePipeline(DiffusionPipeline):
        """Stable Diffusion's denoising loop on precomputed text embeddings (no text encoder)."""

        model_cpu_offload_seq = "unet->vae"

        def __init__(self, unet, vae, scheduler):
            super().__init__()
            self.register_modules(unet=unet, vae=vae, scheduler=scheduler)
            self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)

        @torch.no_grad()
        def __call__(self, prompt_embeds, negative_prompt_embeds, num_inference_steps=8,
                     guidance_scale=5.0, generator=None, output_type="pt"):
            device = self._execution_device
            batch = prompt_embeds.shape[0]
            embeds = torch.cat([negative_prompt_embeds, prompt_embeds]).to(device, self.unet.dtype)
            side = self.unet.config.sample_size
            latents = randn_tensor((batch, self.unet.config.in_channels, side, side),
                                   generator=generator, device=device, dtype=self.unet.dtype)
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            latents = latents * self.scheduler.init_noise_sigma
            # Like StableDiffusionPipeline.prepare_extra_step_kwargs: not every step() takes a generator.
            extra = {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
            for t in self.progress_bar(self.scheduler.timesteps):
                model_in = self.scheduler.scale_model_input(torch.cat([latents] * 2), t)
                uncond, cond = self.unet(model_in, t, encoder_hidden_states=embeds).sample.chunk(2)
                noise_pred = uncond + guidance_scale * (cond - uncond)
                latents = self.scheduler.step(noise_pred, t, latents, **extra).prev_sample
            image = self.vae.decode(latents / self.vae.config.scaling_factor).sample
            image = (image / 2 + 0.5).clamp(0, 1)
            return image if output_type == "pt" else image.cpu().permute(0, 2, 3, 1).float().numpy()

    unet, vae = tiny_unet_and_vae(size)
    pipe = TinyTextToImagePipeline(unet=unet, vae=vae, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)

    def run(prompt_embeds, negative_prompt_embeds, steps, guidance, generator):
        return pipe(prompt_embeds, negative_prompt_embeds, num_inference_steps=steps,
                    guidance_scale=guidance, generator=generator, output_type="pt")
    return pipe, run


def build_sd_pipeline(scheduler, size):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    unet, vae = tiny_unet_and_vae(size)
    # Tiny random text encoder: part of the pipeline, but the prompt goes in as prompt_embeds, so
    # no tokenizer (and no vocabulary download) is needed.
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=100, hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=TEXT_LEN, projection_dim=TEXT_DIM)).eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=None, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   image_encoder=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def run(prompt_embeds, negative_prompt_embeds, steps, guidance, generator):
        side = pipe.unet.config.sample_size * pipe.vae_scale_factor
        return pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                    num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                    height=side, width=side, output_type="pt").images
    return pipe, run


def main(argv=None):
    args = parse_args(argv)
    try:
        import diffusers
    except ImportError:
        print("this example needs diffusers: pip install pygen[diffusers]", file=sys.stderr)
        return 2
    try:
        import pygen.diffusers
    except ImportError:  # run from a source checkout without installing: use the repo's pygen
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        import pygen.diffusers

    kind = args.pipeline
    if kind == "auto":
        kind = "sd" if importlib.util.find_spec("transformers") is not None else "tiny"
    device = torch.device(args.device)

    torch.manual_seed(args.seed)  # random weights and random "prompt" embeddings
    scheduler = getattr(diffusers, SCHEDULER_NAMES[args.scheduler]).from_config(SCHEDULER_CONFIG)
    pipe, run = (build_sd_pipeline if kind == "sd" else build_tiny_pipeline)(scheduler, args.size)
    pipe.to(device)
    prompt_embeds = torch.randn(args.batch, TEXT_LEN, TEXT_DIM, device=device)
    negative_prompt_embeds = torch.randn(args.batch, TEXT_LEN, TEXT_DIM, device=device)

    def timed(steps=args.steps):
        generator = torch.Generator(device).manual_seed(args.seed)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        images = run(prompt_embeds, negative_prompt_embeds, steps, args.guidance, generator)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return images, time.perf_counter() - t0

    print(f"pipeline: {type(pipe).__name__} ({kind}), {args.batch} x {args.size}x{args.size} px, "
          f"{args.steps} steps, guidance {args.guidance}, device {device}")
    timed(steps=1)  # warm-up (first-call costs of the models), not timed
    stock_images, stock_s = timed()
    print(f"stock:   {type(pipe.scheduler).__module__}.{type(pipe.scheduler).__name__}: {stock_s * 1e3:.1f} ms/run")

    pygen.diffusers.patch(pipe)
    assert isinstance(pipe.scheduler, pygen.diffusers.FusedSchedulerMixin), type(pipe.scheduler)
    timed(steps=1)  # warm-up of the fused scheduler
    patched_images, patched_s = timed()
    print(f"patched: {type(pipe.scheduler).__module__}.{type(pipe.scheduler).__name__}: {patched_s * 1e3:.1f} ms/run")

    pygen.diffusers.unpatch(pipe)
    assert pipe.scheduler is scheduler or type(pipe.scheduler) is type(scheduler)
    print(f"unpatched: {type(pipe.scheduler).__module__}.{type(pipe.scheduler).__name__}")

    diff = (stock_images.float() - patched_images.float()).abs().max().item()
    print(f"images: {tuple(patched_images.shape)}, mean {patched_images.float().mean().item():.4f}")
    print(f"max_abs_diff={diff:.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
