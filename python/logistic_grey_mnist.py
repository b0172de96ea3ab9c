"""Train AVME with the discretized logistic likelihood on MNIST's real grey levels, in Python.

The official MNIST IDX files hold 8-bit pixels; scaled to k/255 they are exactly what
``AVME(likelihood="logistic")`` models (no binarization). The script trains on a random subset
of the first 50,000 training images, reports the validation negative ELBO after every epoch on a
subset of the last 10,000 (the official training set's held-out part, as ``mnist_*`` data sets
split it), and at the end an IWAE bound, each in nats per image and bits per dimension.

    python python/logistic_grey_mnist.py --data-root DIR            # DIR holds train-images-idx3-ubyte.gz, ...
    python python/logistic_grey_mnist.py --data-root DIR --epochs 5 --train-images 50000 --device cuda
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from avme_ext.data import MNIST_TRAIN_SIZE, default_data_root, load_mnist_idx
from avme_ext.model import AVME
from avme_ext.results import bits_per_dim


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None, help="folder of the MNIST IDX files (default: avme's data root)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=128, help="LSTM units of encoder and decoder (default 128)")
    parser.add_argument("--latent", type=int, default=20, help="latent size per step (default 20)")
    parser.add_argument("--steps", type=int, default=8, help="drawing steps K (default 8)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-images", type=int, default=10_000, help="random training images (default 10,000)")
    parser.add_argument("--valid-images", type=int, default=1_000, help="random validation images (default 1,000)")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--samples", type=int, default=100, help="IWAE samples per image at the end (0: none)")
    parser.add_argument("--iwae-images", type=int, default=200, help="validation images of the IWAE bound")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def grey_levels(root, seed: int, train_images: int, valid_images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, valid) images (N, 784) as 8-bit intensities k/255: random subsets of MNIST's first
    50,000 and last 10,000 training images."""
    images = load_mnist_idx("train", root, binarize="dynamic").images  # float32 k/255, not binarized
    generator = torch.Generator().manual_seed(seed)
    train = images[:MNIST_TRAIN_SIZE][torch.randperm(MNIST_TRAIN_SIZE, generator=generator)[:train_images]]
    held_out = images[MNIST_TRAIN_SIZE:]
    valid = held_out[torch.randperm(held_out.shape[0], generator=generator)[:valid_images]]
    return train, valid


@torch.no_grad()
def validation_nelbo(model: AVME, valid: torch.Tensor, batch: int, seed: int) -> float:
    """Mean negative ELBO (nats per image) over ``valid``, one seeded noise draw per image."""
    generator = torch.Generator(device=valid.device).manual_seed(seed)
    model.eval()
    total = sum(float(model(valid[i : i + batch], generator=generator).loss.sum()) for i in range(0, len(valid), batch))
    model.train()
    return total / len(valid)


def describe(name: str, nats: float, data_dim: int) -> str:
    return f"{name} {nats:.2f} nats = {bits_per_dim(nats, data_dim):.4f} bits/dim"


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    train, valid = grey_levels(args.data_root or default_data_root(), args.seed, args.train_images, args.valid_images)
    train, valid = train.to(device), valid.to(device)
    torch.manual_seed(args.seed)
    model = AVME(data_dim=784, enc_hidden=args.hidden, dec_hidden=args.hidden, latent_dim=args.latent,
                 steps=args.steps, likelihood="logistic", device=device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    d = model.config.data_dim
    steps_per_epoch = math.ceil(len(train) / args.batch)
    print(f"{model.config}: {len(train)} training and {len(valid)} validation images of MNIST's grey levels, "
          f"{steps_per_epoch} steps of {args.batch} per epoch on {device}")
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed + epoch)).to(device)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{args.epochs}", leave=False)
        for step in bar:
            loss, _ = model.loss(train[order[step * args.batch : (step + 1) * args.batch]], generator=generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.1f}")
        nelbo = validation_nelbo(model, valid, args.batch, seed=args.seed)
        scales = model.likelihood.pixel_log_scale()[0].detach().exp()
        print(f"epoch {epoch}: {describe('validation negative ELBO', nelbo, d)}; logistic scale {float(scales):.4f} "
              f"({time.perf_counter() - start:.0f} s)")
    if args.samples:
        images = valid[: args.iwae_images]
        bound = -model.iwae_bound(images, samples=args.samples, generator=generator).mean()
        print(describe(f"validation IWAE bound (S={args.samples}, {len(images)} images)", float(bound), d))


if __name__ == "__main__":
    main()
