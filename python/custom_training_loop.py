"""Drop ``avme_ext.AVMECore`` into your own training loop.

The core is a plain ``nn.Module`` (two LSTMCells, two Linears): you own the loss, the
optimiser and the data. Here: a Bernoulli reconstruction term on the final canvas, the
per-step Gaussian KL from mu/logvar, plus an extra penalty of our own on the per-step canvases.
It runs the fused CUDA kernels on a GPU (when the extension is built) and the pure-PyTorch
reference on the CPU.

    python python/custom_training_loop.py                              # CPU, small sizes, a few seconds
    python python/custom_training_loop.py --device cuda --paper-sizes  # AVMEConfig's defaults
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from avme_ext.config import AVMEConfig
from avme_ext.core import AVMECore
from avme_ext.loop_types import ENCODER_INPUTS, IMPLS, PRECISIONS

#: Sizes small enough for a CPU run of a few seconds (8x8 "images").
SMALL_SIZES = AVMEConfig(data_dim=64, enc_hidden=32, dec_hidden=32, latent_dim=8, steps=4)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument(
        "--paper-sizes",
        action="store_true",
        help="start from AVMEConfig's defaults (the paper's MNIST sizes) instead of small ones",
    )
    parser.add_argument("--data-dim", type=int, help=f"D, pixels (default {SMALL_SIZES.data_dim})")
    parser.add_argument("--hidden", type=int, help=f"He = Hd, LSTM units (default {SMALL_SIZES.enc_hidden})")
    parser.add_argument("--latent", type=int, help=f"Z, latent size per step (default {SMALL_SIZES.latent_dim})")
    parser.add_argument("--steps", type=int, help=f"K, drawing steps (default {SMALL_SIZES.steps})")
    parser.add_argument(
        "--classes", type=int, help=f"C, condition on one-hot labels (default {SMALL_SIZES.num_classes}: no)"
    )
    parser.add_argument("--encoder-input", choices=ENCODER_INPUTS, help="what the encoder reads besides x")
    parser.add_argument("--impl", choices=IMPLS, default="auto")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def model_config(args: argparse.Namespace) -> AVMEConfig:
    """The sizes to train: the small or the paper's, with the ones given on the command line."""
    given = {
        "data_dim": args.data_dim,
        "enc_hidden": args.hidden,
        "dec_hidden": args.hidden,
        "latent_dim": args.latent,
        "steps": args.steps,
        "num_classes": args.classes,
        "encoder_input": args.encoder_input,
    }
    base = AVMEConfig() if args.paper_sizes else SMALL_SIZES
    return dataclasses.replace(base, **{name: value for name, value in given.items() if value is not None})


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    config = model_config(args)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    core = AVMECore.from_config(config, impl=args.impl, precision=args.precision, device=device)
    print(f"AVMECore running {core.resolved_impl(device, args.batch)!r} on {device}: {core.extra_repr()}")
    optimizer = torch.optim.Adam(core.parameters(), lr=args.lr)
    data_dim, classes = config.data_dim, config.num_classes

    # Toy data: random binary "images" with a fixed structure per class, so there is something to learn.
    num_protos = max(classes, 4)
    protos = (torch.rand(num_protos, data_dim, device=device) < 0.3).float()

    start = time.perf_counter()
    for it in range(1, args.iters + 1):
        labels = torch.randint(0, num_protos, (args.batch,), device=device)
        flips = (torch.rand(args.batch, data_dim, device=device) < 0.05).float()
        x = (protos[labels] + flips) % 2
        y = F.one_hot(labels % classes, classes).float() if classes else None

        out = core(x, y, return_canvases=True)  # eps drawn inside; pass eps= to control it
        recon = F.binary_cross_entropy_with_logits(out.canvas, x, reduction="sum") / args.batch
        kl = 0.5 * (out.mu.square() + out.logvar.exp() - 1.0 - out.logvar).sum() / args.batch
        # our own extra term: keep the intermediate canvases' logits bounded
        smooth = 1e-4 * out.canvases.square().mean()
        loss = recon + kl + smooth

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(core.parameters(), 10.0)
        optimizer.step()
        if it == 1 or it % 10 == 0 or it == args.iters:
            print(f"iter {it:4d}  loss {loss.item():9.3f}  recon {recon.item():9.3f}  kl {kl.item():7.3f}")

    with torch.no_grad():  # generation: decoder + write only, z ~ N(0, I)
        y = F.one_hot(torch.arange(4, device=device) % classes, classes).float() if classes else None
        samples = torch.sigmoid(core.sample(y=y, batch_size=4).canvas)
    print(
        f"done in {time.perf_counter() - start:.1f}s; sample pixel means: "
        + " ".join(f"{v:.2f}" for v in samples.mean(dim=1).tolist())
    )


if __name__ == "__main__":
    main()
