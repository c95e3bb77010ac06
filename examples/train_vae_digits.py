"""Train a small VAE on the 8x8 digits that ship inside scikit-learn (no download), with pygen.losses.

    python examples/train_vae_digits.py            # 100 epochs, well under a minute on a CPU
    python examples/train_vae_digits.py --quick    # the CI smoke setting (a few seconds)

Data: ``sklearn.datasets.load_digits()`` (1797 images of 8x8 pixels, values 0..16), scaled to [0, 1]
and split into 1497 training and 300 test images. The encoder gives (mu, logvar) of a diagonal
Gaussian posterior; each step draws z with the fused ``pygen.losses.vae_reparameterize`` (z and the
analytic KL to N(0, I) in one op, noise from (seed, step)) and minimises the negative ELBO
``pygen.losses.elbo(x, decoder_logits, kl=kl, likelihood="bernoulli")`` (nats per image).

Output (``--out``, default ./out-train_vae_digits): ``digits.png`` (test images, their
reconstructions, samples from the prior), ``elbo_curve.txt`` and ``summary.txt``; the last line
printed is ``test_elbo untrained=<a> trained=<b>`` (nats per image, higher is better; the smoke test
checks b > a).
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

from pygen import losses, plot


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=positive_int, default=100, help="training epochs (default 100)")
    p.add_argument("--batch", type=positive_int, default=128, help="batch size (default 128)")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (default 2e-3)")
    p.add_argument("--latent", type=positive_int, default=8, help="latent dimension (default 8)")
    p.add_argument("--width", type=positive_int, default=256, help="hidden width (default 256)")
    p.add_argument("--likelihood", choices=losses.LIKELIHOODS, default="bernoulli",
                   help="decoder likelihood on pixels/16 (default bernoulli; gaussian uses --sigma)")
    p.add_argument("--sigma", type=float, default=0.1, help="std of the Gaussian likelihood (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the init and the noise (default 0)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch CPU threads (default 1: fastest for this tiny model, and no spinning on a busy machine)")
    p.add_argument("--quick", action="store_true", help="small setting for smoke tests (8 epochs)")
    p.add_argument("--out", default="out-train_vae_digits", help="output directory")
    args = p.parse_args(argv)
    if not args.sigma > 0:
        p.error("--sigma must be > 0")
    if args.quick:
        args.epochs = min(args.epochs, 8)
    return args


class VAE(torch.nn.Module):
    def __init__(self, dim=64, latent=8, width=256):
        super().__init__()
        self.encoder = torch.nn.Sequential(
            torch.nn.Linear(dim, width), torch.nn.SiLU(), torch.nn.Linear(width, width), torch.nn.SiLU(),
            torch.nn.Linear(width, 2 * latent))
        self.decoder = torch.nn.Sequential(
            torch.nn.Linear(latent, width), torch.nn.SiLU(), torch.nn.Linear(width, width), torch.nn.SiLU(),
            torch.nn.Linear(width, dim))

    def encode(self, x):
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu.contiguous(), logvar.contiguous()

    def loss(self, x, seed, stream, likelihood, sigma):
        """Negative ELBO (nats per image, mean over the batch) with the fused reparameterization + KL."""
        mu, logvar = self.encode(x)
        z, kl = losses.vae_reparameterize(mu, logvar, seed=seed, stream=stream)
        return losses.elbo(x, self.decoder(z), kl=kl, likelihood=likelihood, sigma=sigma)

    def mean_image(self, logits_or_mean, likelihood):
        return torch.sigmoid(logits_or_mean) if likelihood == "bernoulli" else logits_or_mean.clamp(0, 1)


def load_digits(seed):
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        sys.exit("train_vae_digits.py needs scikit-learn for its bundled 8x8 digits: pip install scikit-learn")
    images = torch.from_numpy(sk_load_digits().data).to(torch.float32) / 16.0  # (1797, 64) in [0, 1]
    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    return images[perm[300:]], images[perm[:300]]


@torch.no_grad()
def test_elbo(model, x, args):
    """ELBO on the test images (nats per image), averaged over 4 draws of z."""
    return -sum(model.loss(x, args.seed + 1, k, args.likelihood, args.sigma).item() for k in range(4)) / 4


def image_grid(rows, labels, cell=4, gap=2, label_w=64):
    """(H, W, 3) uint8: one row per list of 8x8 images in [0, 1], each upscaled ``cell`` times, labelled."""
    cols = max(len(r) for r in rows)
    side = 8 * cell
    h = len(rows) * (side + gap) + gap
    w = label_w + cols * (side + gap) + gap
    img = np.full((h, w, 3), 255, dtype=np.uint8)
    for i, (row, label) in enumerate(zip(rows, labels)):
        y = gap + i * (side + gap)
        plot.render_text(img, label, 4, y + side // 2 - 4)
        for j, im in enumerate(row):
            pix = (255 * (1 - im.reshape(8, 8).clamp(0, 1).numpy())).round().astype(np.uint8)  # dark ink
            big = np.kron(pix, np.ones((cell, cell), dtype=np.uint8))
            x = label_w + gap + j * (side + gap)
            img[y:y + side, x:x + side] = big[..., None]
    return img


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train, test = load_digits(args.seed)
    model = VAE(latent=args.latent, width=args.width)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    elbo_untrained = test_elbo(model, test, args)
    print(f"epoch     0  test elbo {elbo_untrained:9.3f}")

    order_gen = torch.Generator().manual_seed(args.seed)
    curve = []
    step = 0
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        perm = torch.randperm(train.shape[0], generator=order_gen)
        total, count = 0.0, 0
        for i in range(0, train.shape[0], args.batch):
            x = train[perm[i:i + args.batch]]
            loss = model.loss(x, args.seed, step, args.likelihood, args.sigma)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * x.shape[0]
            count += x.shape[0]
            step += 1
        train_elbo = -total / count
        report = epoch % max(1, args.epochs // 10) == 0 or epoch == args.epochs
        te = test_elbo(model, test, args) if report else float("nan")
        curve.append((epoch, train_elbo, te))
        if report:
            print(f"epoch {epoch:5d}  train elbo {train_elbo:9.3f}  test elbo {te:9.3f}")
    train_s = time.perf_counter() - t0
    elbo_trained = curve[-1][2]

    with torch.no_grad():
        shown = test[:12]
        mu, _ = model.encode(shown)
        recon = model.mean_image(model.decoder(mu), args.likelihood)
        z = torch.randn(12, args.latent, generator=torch.Generator().manual_seed(args.seed + 2))
        samples = model.mean_image(model.decoder(z), args.likelihood)
    plot.write_png(os.path.join(args.out, "digits.png"),
                   image_grid([list(shown), list(recon), list(samples)], ["TEST", "RECON", "PRIOR"]))
    with open(os.path.join(args.out, "elbo_curve.txt"), "w") as f:
        f.write("epoch train_elbo test_elbo\n")
        f.writelines(f"{e} {tr:.4f} {te:.4f}\n" for e, tr, te in curve)
    lines = [
        f"likelihood={args.likelihood} latent={args.latent} epochs={args.epochs} steps={step} batch={args.batch}",
        f"train_seconds={train_s:.2f} final_train_elbo={curve[-1][1]:.3f}",
        f"test_elbo untrained={elbo_untrained:.3f} trained={elbo_trained:.3f}",
    ]
    with open(os.path.join(args.out, "summary.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return elbo_untrained, elbo_trained


if __name__ == "__main__":
    main()
    sys.exit(0)
