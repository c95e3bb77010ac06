"""Train a small energy-based model on a 2-D ring of Gaussians with persistent contrastive divergence.

    python examples/train_ebm.py             # 1000 steps, well under a minute on a CPU
    python examples/train_ebm.py --quick     # the CI smoke setting (a few seconds)

The model is p(x) ∝ exp(-E(x)) with E a small MLP. Each training step is one
``pygen.losses.contrastive_divergence_step``: the positive phase on a data batch, the negative phase on
short-run Langevin chains (``pygen.mcmc.ula``) started from a persistent ``pygen.losses.ReplayBuffer``
(5% of the chains restarted from uniform noise), loss E(x+) - E(x-) plus a small energy regulariser.
Afterwards fresh chains are run from uniform noise with Langevin under the trained energy and
compared with exact samples of the data distribution.

Output (``--out``, default ./out-train_ebm): ``samples.png`` (data, Langevin under the untrained energy,
Langevin under the trained energy, the replay buffer) and ``summary.txt``; the last line printed is
``sliced_wasserstein untrained=<a> trained=<b>`` (lower is better; the smoke test checks b < a).
"""
import argparse
import os
import sys
import time

import torch

import pygen
from pygen import losses, metrics, models, plot


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=positive_int, default=1000, help="training steps (default 1000)")
    p.add_argument("--batch", type=positive_int, default=256, help="data and negative batch size (default 256)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--width", type=positive_int, default=128, help="MLP hidden width (default 128)")
    p.add_argument("--langevin-steps", type=positive_int, default=20,
                   help="Langevin steps per training step (default 20)")
    p.add_argument("--step-size", type=float, default=0.01, help="Langevin dt (default 0.01)")
    p.add_argument("--alpha", type=float, default=0.1, help="energy regulariser weight (default 0.1)")
    p.add_argument("--buffer", type=positive_int, default=8192, help="replay buffer capacity (default 8192)")
    p.add_argument("--eval-steps", type=positive_int, default=300,
                   help="Langevin steps of the evaluation chains (default 300)")
    p.add_argument("--samples", type=positive_int, default=2000, help="evaluation chains (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the init and the noise (default 0)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch CPU threads (default 1: fastest for this tiny model, and no spinning on a busy machine)")
    p.add_argument("--quick", action="store_true",
                   help="small setting for smoke tests (200 steps, 150 evaluation Langevin steps, 1000 chains)")
    p.add_argument("--out", default="out-train_ebm", help="output directory")
    args = p.parse_args(argv)
    if not args.step_size > 0:
        p.error("--step-size must be > 0")
    if args.quick:
        args.steps, args.eval_steps, args.samples = min(args.steps, 200), min(args.eval_steps, 150), \
            min(args.samples, 1000)
    return args


class Energy(torch.nn.Module):
    def __init__(self, dim=2, width=128):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim, width), torch.nn.SiLU(),
            torch.nn.Linear(width, width), torch.nn.SiLU(),
            torch.nn.Linear(width, width), torch.nn.SiLU(),
            torch.nn.Linear(width, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)


def langevin_samples(energy, n, args, lo, hi):
    """Chains from uniform noise on [lo, hi]², run for --eval-steps Langevin steps under ``energy``."""
    start = losses.ReplayBuffer(n, (2,), reinit_prob=0.0, init="uniform", low=lo, high=hi,
                                seed=args.seed + 1).data
    return pygen.mcmc.ula(start, energy_fn=energy, step_size=args.step_size, n_steps=args.eval_steps,
                          seed=args.seed + 2, stream=0)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    mixture = models.ring(k=8, radius=3.0, std=0.25, dtype=torch.float32)
    data_gen = torch.Generator().manual_seed(args.seed)
    lo, hi = -4.5, 4.5
    energy = Energy(width=args.width)
    opt = torch.optim.Adam(energy.parameters(), lr=args.lr, betas=(0.0, 0.999))
    buffer = losses.ReplayBuffer(args.buffer, (2,), reinit_prob=0.05, init="uniform", low=lo, high=hi,
                                 seed=args.seed)

    truth = mixture.sample(args.samples, data_gen)
    swd_gen = torch.Generator()
    untrained = langevin_samples(energy, args.samples, args, lo, hi)
    swd_untrained = metrics.sliced_wasserstein(untrained, truth, generator=swd_gen.manual_seed(12345))

    t0 = time.perf_counter()
    curve = []
    for step in range(args.steps):
        x = mixture.sample(args.batch, data_gen)
        loss = losses.contrastive_divergence_step(energy, x, buffer, n_steps=args.langevin_steps,
                                                  step_size=args.step_size, seed=args.seed, stream=step,
                                                  alpha=args.alpha, clamp=(lo, hi))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.append(loss.item())
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            window = curve[-max(1, args.steps // 10):]
            print(f"step {step:5d}  cd loss {sum(window) / len(window):+.4f}")
    train_s = time.perf_counter() - t0

    trained = langevin_samples(energy, args.samples, args, lo, hi)
    finite = torch.isfinite(trained).all(1)
    swd_trained = metrics.sliced_wasserstein(trained[finite], truth, generator=swd_gen.manual_seed(12345)) \
        if bool(finite.any()) else float("inf")
    swd_buffer = metrics.sliced_wasserstein(buffer.data, truth, generator=swd_gen.manual_seed(12345))
    skipped = plot.density_figure(
        mixture, [("data", truth), ("untrained", untrained), ("trained", trained), ("replay buffer", buffer.data)],
        os.path.join(args.out, "samples.png"), size=220, columns=4,
        extent=(lo, hi, lo, hi))
    lines = [
        f"steps={args.steps} batch={args.batch} langevin_steps={args.langevin_steps} step_size={args.step_size} "
        f"alpha={args.alpha}",
        f"train_seconds={train_s:.2f} final_cd_loss={sum(curve[-50:]) / len(curve[-50:]):+.4f}",
        f"eval: {args.samples} chains x {args.eval_steps} Langevin steps from uniform noise; nonfinite={skipped}",
        f"mode_weight_error={metrics.mode_weight_error(trained[finite], mixture):.4f}",
        f"sliced_wasserstein replay_buffer={swd_buffer:.4f}",
        f"sliced_wasserstein untrained={swd_untrained:.4f} trained={swd_trained:.4f}",
    ]
    with open(os.path.join(args.out, "summary.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return swd_untrained, swd_trained


if __name__ == "__main__":
    main()
    sys.exit(0)
